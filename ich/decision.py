"""The study decision: one rule, used by training, evaluation and the worker alike (DESIGN §7).

Radiologists act on studies, not slices. A threshold applied to every slice turns each normal
slice into one more chance of a false alert (with slice specificity s and n normal slices a normal
study alerts with probability ≈ 1 − sⁿ: 99 % for s = 0.85, n = 30). So the decision is taken per
study: a rule reduces the slice probabilities of a study to one **study score** per label, and
the study is positive for `any` when that score reaches its threshold, chosen on calibration
*studies* for a target *study* recall (`training.studies`). A subtype is named only on a study
that is positive for `any`, when its own score reaches its own threshold: an alert is about a
bleed first, its type second.

Rules (`StudyRule.name`, with `k` slices):

- ``max``: the highest slice probability (k = 1). One bright slice decides.
- ``consecutive``: the highest probability that k neighbouring slices of one series all reach
  (the maximum over windows of k neighbouring slices of their minimum). A single noisy slice
  cannot raise it; a bleed seen on k neighbouring slices does. A series shorter than k slices
  scores 0.
- ``topk``: the mean of the k highest slice probabilities of the study; slices not yet received
  count 0, so the score only grows while a study arrives.

A slice sent twice (same instance number, or same z, in one series) counts once, at its higher
probability.

Streaming: the worker re-evaluates the rule on every slice of the study scored so far each time a
batch adds to it, and the first time the `any` score reaches its threshold the `first_positive`
alert fires; nothing waits for the end of the series. `first_positive_index` replays the same
function over the prefixes of an arrival order, so offline evaluation and the worker decide
identically on identical probabilities (a test holds them to it).

Neighbours are neighbours in space, within one series: consecutive instance numbers when every
slice of the series has one — a slice not yet received breaks the run, so the score can only
grow as slices arrive, in any order, and a first_positive is never contradicted by the summary —
else consecutive z of ImagePositionPatient, else arrival order. A study's score is its best
series'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ich.labels import ANY, DEFAULT_THRESHOLDS, LABELS

RULES = ("max", "consecutive", "topk")
MAX_K = 16


class RuleError(ValueError):
    """A study rule a model card must not carry (unknown name, k out of range)."""


@dataclass(frozen=True)
class SliceScore:
    """One scored slice as the rule sees it: where it lies and what the model said."""

    probabilities: Sequence[float]      # LABELS order
    series: str = ""
    position: float | None = None        # z of ImagePositionPatient, mm
    instance: float | None = None        # InstanceNumber
    key: Any = None                      # the caller's handle (SOP Instance UID, row index)


@dataclass(frozen=True)
class Decision:
    """The rule applied to a study: a score and a verdict per label, and the slices behind the
    `any` score (the evidence an alert lists)."""

    scores: dict[str, float]
    positive: dict[str, bool]
    evidence: list[int]                  # indices into the slices given, behind the `any` score

    @property
    def any(self) -> bool:
        return self.positive[ANY]


@dataclass(frozen=True)
class StudyRule:
    name: str = "max"
    k: int = 1
    thresholds: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise RuleError(f"unknown study rule {self.name!r}; expected one of {', '.join(RULES)}")
        if not 1 <= int(self.k) <= MAX_K or (self.name == "max" and self.k != 1):
            raise RuleError(f"study rule {self.name} needs 1 <= k <= {MAX_K} (max: k = 1), got {self.k}")

    # --- description ------------------------------------------------------------------------

    @classmethod
    def from_card(cls, rule: Mapping[str, Any] | None, thresholds: Mapping[str, float]) -> "StudyRule":
        """The rule of a model card (`{"name": ..., "k": ...}`); a card without one is read as
        `max`, which with its thresholds reproduces what older workers did."""
        rule = dict(rule or {"name": "max", "k": 1})
        return cls(str(rule.get("name", "max")), int(rule.get("k", 1)),
                   {**DEFAULT_THRESHOLDS, **thresholds})

    def describe(self) -> dict[str, Any]:
        """What model.json and alerts carry: name and k (thresholds travel separately)."""
        return {"name": self.name, "k": int(self.k)}

    def __str__(self) -> str:
        return self.name if self.name == "max" else f"{self.name}-{self.k}"

    def with_thresholds(self, thresholds: Mapping[str, float]) -> "StudyRule":
        return StudyRule(self.name, self.k, {**self.thresholds, **thresholds})

    # --- the decision -----------------------------------------------------------------------

    def scores(self, probabilities, series=None, positions=None, instances=None) -> np.ndarray:
        """(n, labels) slice probabilities of one study → (labels,) study scores."""
        return _scores(self.name, self.k, _matrix(probabilities), series, positions, instances)[0]

    def decide(self, slices: Sequence[SliceScore]) -> Decision:
        """The verdict on a study from the slices scored so far (in any order)."""
        p, series, positions, instances = _columns(slices)
        scores, evidence = _scores(self.name, self.k, p, series, positions, instances)
        named = {label: float(s) for label, s in zip(LABELS, scores)}
        return Decision(named, self.verdict(named), evidence)

    def verdict(self, scores: Mapping[str, float]) -> dict[str, bool]:
        """Study scores → positive per label: `any` by its threshold, a subtype by its own
        threshold and only where `any` is positive."""
        bleed = scores[ANY] >= self.thresholds[ANY]
        return {label: bool(bleed and scores[label] >= self.thresholds[label]) for label in LABELS}

    def first_positive_index(self, slices: Sequence[SliceScore], label: str = ANY) -> int | None:
        """Replay `slices` in the order given (arrival order) and return the index of the slice
        whose arrival first made the study positive for `label`; None if it never does. This is
        exactly what the worker does when each slice arrives in its own batch."""
        p, series, positions, instances = _columns(slices)
        column = LABELS.index(label)
        threshold = self.thresholds[label]
        for i in range(len(slices)):
            s, _ = _scores(self.name, self.k, p[: i + 1], series[: i + 1], positions[: i + 1],
                           instances[: i + 1], columns=[column])
            if s[0] >= threshold:
                return i
        return None


# ----------------------------------------------------------------------------- internals


def _matrix(probabilities) -> np.ndarray:
    p = np.asarray(probabilities, np.float64)
    return p.reshape(-1, len(LABELS)) if p.size else np.zeros((0, len(LABELS)))


def _nan(value) -> float:
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class _Layout:
    """Where the slices of a study lie: per series, runs of neighbouring slice groups. A group
    is one slice, or the copies of one slice (same instance number, or same z) sent twice."""

    runs: list[list[np.ndarray]]   # per run: groups (row-index arrays) in spatial order

    def groups(self) -> list[np.ndarray]:
        return [g for run in self.runs for g in run]


def _layout(series, positions, instances) -> _Layout:
    """Neighbours, decided the same way for a whole series: by instance number when every slice
    of the series has one (consecutive numbers are neighbours: a slice not yet received breaks
    the run, so a neighbour rule can only grow as slices arrive, in any order); else by z when
    every slice has one; else in arrival order."""
    by_series: dict[Any, list[int]] = {}
    for i, s in enumerate(series):
        by_series.setdefault(s, []).append(i)
    runs: list[list[np.ndarray]] = []
    for rows in by_series.values():
        rows = np.asarray(rows)
        inst, pos = instances[rows], positions[rows]
        if not np.isnan(inst).any():
            keys, gap = inst, lambda a, b: b - a != 1
        elif not np.isnan(pos).any():
            keys, gap = np.round(pos, 2), lambda a, b: False
        else:
            runs.append([np.array([r]) for r in rows])
            continue
        order = np.argsort(keys, kind="stable")
        values, starts = np.unique(keys[order], return_index=True)
        groups = np.split(rows[order], starts[1:])
        run = [groups[0]]
        for j in range(1, len(groups)):
            if gap(values[j - 1], values[j]):
                runs.append(run)
                run = []
            run.append(groups[j])
        runs.append(run)
    return _Layout(runs)


def _columns(slices: Sequence[SliceScore]):
    p = _matrix([s.probabilities for s in slices])
    series = np.array([s.series or "" for s in slices], dtype=object)
    positions = np.array([_nan(s.position) for s in slices])
    instances = np.array([_nan(s.instance) for s in slices])
    return p, series, positions, instances


def _scores(name: str, k: int, p: np.ndarray, series=None, positions=None, instances=None,
            columns=None) -> tuple[np.ndarray, list[int]]:
    """Study scores of the chosen label columns, and the rows behind the last column's score."""
    columns = list(range(p.shape[1])) if columns is None else columns
    n = len(p)
    if n == 0:
        return np.zeros(len(columns)), []
    p = p[:, columns]
    last = len(columns) - 1
    if name == "max":
        return p.max(axis=0), [int(np.argmax(p[:, last]))]
    nan = np.full(n, math.nan)
    layout = _layout(np.zeros(n, dtype=object) if series is None else np.asarray(series, dtype=object),
                     nan if positions is None else np.asarray(positions, np.float64),
                     nan if instances is None else np.asarray(instances, np.float64))
    if name == "topk":   # over distinct slices: a slice sent twice counts once
        groups = layout.groups()
        g = np.array([p[rows].max(axis=0) for rows in groups])
        top = np.sort(g, axis=0)[::-1][:k]
        order = np.argsort(-g[:, last], kind="stable")[:k]
        return top.sum(axis=0) / k, [int(r) for i in order for r in groups[i]]
    # consecutive: windows of k neighbouring slices of one series
    best = np.zeros(p.shape[1])
    evidence: list[int] = []
    best_last = -1.0
    for run in layout.runs:
        if len(run) < k:
            continue
        g = np.array([p[rows].max(axis=0) for rows in run])
        windows = np.lib.stride_tricks.sliding_window_view(g, k, axis=0).min(axis=-1)
        best = np.maximum(best, windows.max(axis=0))
        w = int(np.argmax(windows[:, last]))
        if windows[w, last] > best_last:
            best_last = float(windows[w, last])
            evidence = [int(r) for rows in run[w:w + k] for r in rows]
    return best, evidence
