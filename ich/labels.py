"""The six RSNA labels in model output order, and the competition's log-loss weights.

Order matters: it is the order of the model's sigmoid outputs, of `model.json["labels"]`
and of every probability vector that crosses a process boundary.
"""
from __future__ import annotations

import numpy as np

SUBTYPES: tuple[str, ...] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)
ANY = "any"
LABELS: tuple[str, ...] = SUBTYPES + (ANY,)

#: RSNA 2019 weighted multi-label log loss: `any` counts twice, each subtype once.
WEIGHTS: dict[str, float] = {**{s: 1.0 for s in SUBTYPES}, ANY: 2.0}

#: The same weights as a vector in LABELS order, for vectorised loss computations.
WEIGHT_VECTOR = np.array([WEIGHTS[label] for label in LABELS], dtype=np.float32)

#: Recall-first default: a missed bleed is the costly error (DESIGN §1).
DEFAULT_THRESHOLDS: dict[str, float] = {label: 0.5 for label in SUBTYPES} | {ANY: 0.15}


def index(label: str) -> int:
    """Position of `label` in the model output; a clear error for a misspelt label."""
    try:
        return LABELS.index(label)
    except ValueError:
        raise KeyError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}") from None
