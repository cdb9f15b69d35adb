"""Tiny model artifacts for worker tests, written with the real artifact code (ich.model).

`blood_detector` is a small network with hand-set weights whose `any` output counts pixels in
the blood band away from bone, so tests know which slices are positive without training.
`random_inception` is the production architecture, untrained, to prove the serving path.
`LOOP_ENGINE` is the small engine of the training-loop tests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ich.labels import LABELS
from ich.model import ModelCard, build_model, promote, save_artifact

SIZE = 96

#: The engine of tests that exercise the training loop's machinery (strategies, resume, weight
#: averaging, precision, refusal), which does not depend on the engine: MobileNet's first
#: training step traces in 8.9 s on 2 CPU cores against InceptionV3's 24.1 s (75², batch 4).
#: The product's engine is trained by tests/training/test_training.py's CLI run and
#: test_fused_bn, and served by the worker tests.
LOOP_ENGINE = "MobileNet"


def blood_detector(root: Path, version: str = "test-detector-1", min_pixels: float = 2.5,
                   study_rule: dict | None = None) -> Path:
    """A hand-weighted detector: `any` = σ(4·(n − min_pixels)), n = pixels where the 5×5 mean
    of the brain window is ≥ 0.72 (≈ 58 HU: blood, not noisy brain) and no bone-bright
    soft-tissue-window pixel lies within 3 pixels (skull edges are not blood). Subtypes mirror
    `any`. It finds the large lesions of tests/ctfactory and phantom intraparenchymal bleeds.
    `study_rule`: the card's study rule (default: a card without one, read as `max`)."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3), name="windows")
    brain = keras.layers.Conv2D(1, 1, use_bias=False, name="brain")(inputs)
    soft = keras.layers.Conv2D(1, 1, use_bias=False, name="soft")(inputs)
    bright = keras.layers.AveragePooling2D(5, strides=1, padding="same")(brain)
    bone = keras.layers.MaxPooling2D(7, strides=1, padding="same")(soft)
    is_bright = keras.layers.Dense(1, activation="sigmoid", name="is_bright")(bright)
    not_bone = keras.layers.Dense(1, activation="sigmoid", name="not_bone")(bone)
    blood = keras.layers.Multiply()([is_bright, not_bone])
    fraction = keras.layers.GlobalAveragePooling2D(name="fraction")(blood)
    outputs = keras.layers.Dense(len(LABELS), activation="sigmoid", name="ich")(fraction)
    model = keras.Model(inputs, outputs)
    pick = np.zeros((1, 1, 3, 1), np.float32)
    pick[0, 0, 0, 0] = 1.0
    model.get_layer("brain").set_weights([pick.copy()])
    pick[0, 0, 0, 0], pick[0, 0, 2, 0] = 0.0, 1.0
    model.get_layer("soft").set_weights([pick])
    steep = 80.0
    model.get_layer("is_bright").set_weights([np.array([[steep]]), np.array([-steep * 0.72])])
    model.get_layer("not_bone").set_weights([np.array([[-steep]]), np.array([steep * 0.85])])
    k = 4.0 * SIZE * SIZE  # the pooled mean is n / SIZE²
    model.get_layer("ich").set_weights([np.full((1, len(LABELS)), k, np.float32),
                                        np.full((len(LABELS),), -4.0 * min_pixels, np.float32)])
    card = ModelCard(version=version, engine="test-detector", input_size=SIZE)
    if study_rule:
        card.study_rule = dict(study_rule)
    return _publish(model, card, root)


def random_inception(root: Path, version: str = "test-inception-1", status: str = "ok",
                     flip_average: bool = False, engine: str = "InceptionV3") -> Path:
    """`status="failed"`: a card that says training's quality check failed. `flip_average`:
    the graph that averages each slice with its mirror (`ich.model.build_model`). `engine`:
    LOOP_ENGINE where what is tested is the card or the graph around the engine."""
    model = build_model(engine, SIZE, weights=None, flip_average=flip_average)
    verdict = {"passed": False, "reasons": ["held-out any AUC 0.500 < 0.75"]} if status == "failed" else {}
    card = ModelCard(version=version, engine=engine, input_size=SIZE, status=status, verdict=verdict)
    return _publish(model, card, root)


def _publish(model, card: ModelCard, root: Path) -> Path:
    folder = save_artifact(model, card, root)
    promote(folder, root / "current")
    return root / "current"
