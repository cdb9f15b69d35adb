"""Slice context: a small 1-D convolutional head over the ordered slices of a study.

The slice model sees one slice; a radiologist scrolls through the stack. The head reads, for each
run of neighbouring slices of a series (neighbours as `ich.decision` defines them: consecutive
instance numbers, else z), every slice's pooled InceptionV3 features and its calibrated logits,
and returns a context-aware probability per slice and label. The study rule then applies to
those exactly as to the slice model's. It starts as the identity (its correction layer is
zero-initialised), is trained after the slice model on the training studies' features, and its
epoch is chosen on calibration.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ich.labels import LABELS

log = logging.getLogger(__name__)

#: The slice model's output layer; its input is the pooled feature vector.
OUTPUT_LAYER = "ich"
EPS = 1e-6


def feature_model(model):
    """The slice model with a second output: the pooled features its output layer reads."""
    import keras

    return keras.Model(model.input, [model.output, model.get_layer(OUTPUT_LAYER).input])


def embed(model, slices, decoder, batch_size: int = 32, workers: int = 2):
    """(rows, probabilities, features) of every decodable slice, in inference mode."""
    import tensorflow as tf

    from training.data import dataset

    both = feature_model(model)
    forward = tf.function(lambda x: both(x, training=False), reduce_retracing=True)
    rows, probs, feats = [], [], []
    for images, index in dataset(slices, decoder, batch_size, training=False, workers=workers):
        p, f = forward(images)
        rows.append(index.numpy())
        probs.append(np.asarray(p))
        feats.append(np.asarray(f, np.float32))
    if not rows:
        return np.zeros(0, int), np.zeros((0, len(LABELS)), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(rows), np.concatenate(probs), np.concatenate(feats)


def runs(headers) -> list[np.ndarray]:
    """Row indices of every run of neighbouring slices, in spatial order, per study: the
    sequences the head reads. Copies of one slice (same instance) keep the first."""
    from ich.decision import _layout

    by_study: dict[str, list[int]] = {}
    for row, uid in enumerate(headers.studies):
        by_study.setdefault(str(uid), []).append(row)
    out = []
    for rows in by_study.values():
        rows = np.asarray(rows)
        layout = _layout(np.asarray(headers.series[rows], dtype=object),
                         np.asarray(headers.positions[rows], np.float64),
                         np.asarray(headers.instances[rows], np.float64))
        for run in layout.runs:
            out.append(rows[[int(group[0]) for group in run]])
    return out


def build_head(dim: int, width: int = 32, dropout: float = 0.3):
    """features (n, dim) + slice logits (n, 6) → context probabilities (n, 6).

    A per-slice bottleneck of the features, two 3-slice convolutions (each output sees two
    neighbours either side), and a zero-initialised correction added to the slice logits."""
    import keras

    feats = keras.Input((None, dim), name="features")
    logits = keras.Input((None, len(LABELS)), name="logits")
    x = keras.layers.Dropout(dropout)(feats)
    x = keras.layers.Dense(width, activation="relu", name="bottleneck")(x)
    x = keras.layers.Concatenate()([x, logits])
    x = keras.layers.Conv1D(width, 3, padding="same", activation="relu", name="context_1")(x)
    x = keras.layers.Conv1D(width, 3, padding="same", activation="relu", name="context_2")(x)
    delta = keras.layers.Dense(len(LABELS), kernel_initializer="zeros", name="correction")(x)
    out = keras.layers.Activation("sigmoid", name="ich_context")(keras.layers.Add()([logits, delta]))
    return keras.Model([feats, logits], out, name="ich_context")


def logits_of(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p)).astype(np.float32)


@dataclass
class Sequences:
    """The runs of one split, ready for the head."""

    runs: list[np.ndarray]       # row indices into y / p / f
    y: np.ndarray
    p: np.ndarray
    f: np.ndarray

    def item(self, i: int):
        r = self.runs[i]
        return (self.f[r][None], logits_of(self.p[r])[None]), self.y[r][None]


def apply(head, seqs: Sequences) -> np.ndarray:
    """Context probabilities for every row of `seqs` (rows outside any run keep p)."""
    out = np.array(seqs.p, np.float32, copy=True)
    for i, r in enumerate(seqs.runs):
        (f, lg), _ = seqs.item(i)
        out[r] = np.asarray(head([f, lg], training=False))[0]
    return out


def fit_head(train: Sequences, calib: Sequences, epochs: int = 12, lr: float = 1e-3,
             seed: int = 0, width: int = 32):
    """Train on the training runs (one run per step: no padding, exactly what serving sees);
    keep the epoch with the lowest calibration slice log loss. Returns (head, history)."""
    import keras

    from training.evaluate import weighted_log_loss

    keras.utils.set_random_seed(seed)
    head = build_head(train.f.shape[1], width)
    head.compile(optimizer=keras.optimizers.Adam(lr), loss=keras.losses.BinaryCrossentropy())
    rng = np.random.default_rng(seed)
    best, best_loss, history = head.get_weights(), weighted_log_loss(calib.y, apply(head, calib)), []
    log.info("context head: calibration weighted log loss %.4f before training", best_loss)
    for epoch in range(1, epochs + 1):
        losses = []
        for i in rng.permutation(len(train.runs)):
            x, y = train.item(int(i))
            losses.append(float(head.train_on_batch(list(x), y)))
        loss = weighted_log_loss(calib.y, apply(head, calib))
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "calibration_wll": loss})
        log.info("context head epoch %d: loss %.4f, calibration weighted log loss %.4f",
                 epoch, np.mean(losses), loss)
        if loss < best_loss - 1e-5 or math.isnan(best_loss):
            best, best_loss = head.get_weights(), loss
    head.set_weights(best)
    return head, history
