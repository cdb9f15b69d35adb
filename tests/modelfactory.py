"""Tiny model artifacts for worker tests, written with the real artifact code (ich.model).

`blood_detector` is a 75×75 network with hand-set weights whose `any` output rises with the
fraction of pixels in the blood band (brain window bright, soft-tissue window not bone-bright),
so tests know which slices are positive without training. `random_inception` is the production
architecture at its minimum input size, untrained, to prove the serving path loads it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ich.labels import LABELS
from ich.model import ModelCard, build_model, promote, save_artifact

SIZE = 75


def blood_detector(root: Path, version: str = "test-detector-1", area: float = 0.04) -> Path:
    """`any` ≈ sigmoid(400·(blood fraction − area)); subtypes mirror it; returns models/current."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3), name="windows")
    # Channel 0 brain window (L40/W80): blood 64-80 HU ≥ 0.8. Channel 2 soft tissue (L40/W380):
    # bone ≥ 0.9, blood ≈ 0.6. Indicator = σ(60(brain-0.8)) − σ(60(soft-0.9)).
    both = keras.layers.Conv2D(2, 1, activation="sigmoid", name="bands")(inputs)
    blood = keras.layers.Conv2D(1, 1, use_bias=False, name="blood")(both)
    fraction = keras.layers.GlobalAveragePooling2D(name="fraction")(blood)
    outputs = keras.layers.Dense(len(LABELS), activation="sigmoid", name="ich")(fraction)
    model = keras.Model(inputs, outputs)
    w = np.zeros((1, 1, 3, 2), np.float32)
    w[0, 0, 0, 0], w[0, 0, 2, 1] = 60.0, 60.0
    model.get_layer("bands").set_weights([w, np.array([-48.0, -54.0], np.float32)])
    model.get_layer("blood").set_weights([np.array([1.0, -1.0], np.float32).reshape(1, 1, 2, 1)])
    k = 400.0
    model.get_layer("ich").set_weights([np.full((1, len(LABELS)), k, np.float32),
                                        np.full((len(LABELS),), -k * area, np.float32)])
    return _publish(model, ModelCard(version=version, engine="test-detector", input_size=SIZE), root)


def random_inception(root: Path, version: str = "test-inception-1") -> Path:
    model = build_model("InceptionV3", SIZE, weights=None)
    return _publish(model, ModelCard(version=version, input_size=SIZE), root)


def _publish(model, card: ModelCard, root: Path) -> Path:
    folder = save_artifact(model, card, root)
    promote(folder, root / "current")
    return root / "current"
