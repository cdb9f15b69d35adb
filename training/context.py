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


def feature_model(model):
    """The slice model with a second output: the pooled features its output layer reads."""
    import keras

    return keras.Model(model.input, [model.output, model.get_layer(OUTPUT_LAYER).input])


def embed(model, batches):
    """(rows, probabilities, features) of every slice an inference pipeline yields as
    (images, row indices), in inference mode."""
    import tensorflow as tf

    both = feature_model(model)
    forward = tf.function(lambda x: both(x, training=False), reduce_retracing=True)
    rows, probs, feats = [], [], []
    for images, index in batches:
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
    """float32 logits for the head's input (training.evaluate.logit, clipped as it clips)."""
    from training.evaluate import logit

    return logit(p).astype(np.float32)


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


def measure(model, parts: dict, target_recall: float | None, candidates,
            epochs: int = 12, seed: int = 0, confidence: float | None = None) -> tuple[object, dict]:
    """Train the head on `parts["train"]`, choose its study rule and thresholds on
    `parts["calibration"]`, and report study figures on every other part (test, held-out
    sites), as `training.evaluate.figures` does for the slice model. `parts`: name →
    (Slices, Headers, inference pipeline of (images, row indices)). Returns (head, the figures
    for model.json)."""
    import time

    from training import evaluate, studies

    started = time.perf_counter()
    seqs, headers = {}, {}
    for name, (slices, h, batches) in parts.items():
        rows, p, f = embed(model, batches)
        headers[name] = h.take(rows)
        seqs[name] = Sequences(runs(headers[name]), slices.labels[rows], p, f)
    head, history = fit_head(seqs["train"], seqs["calibration"], epochs=epochs, seed=seed)
    probs = {name: apply(head, s) for name, s in seqs.items()}
    calibration = studies.StudySet.build(seqs["calibration"].y, probs["calibration"], headers["calibration"])
    rule, table = studies.choose_rule(calibration, target_recall, candidates, confidence)
    thresholds = evaluate.choose_thresholds(seqs["calibration"].y, probs["calibration"], 0.95)
    report = {"rule": rule.describe(), "thresholds": dict(rule.thresholds), "history": history,
              "calibration_rules": table}
    for name in parts:
        if name in ("train", "calibration"):
            continue
        figures = evaluate.figures(seqs[name].y, probs[name], headers[name], thresholds, rule)
        report[name] = {k: figures[k] for k in ("weighted_log_loss", "prevalence_log_loss",
                                                "images", "per_label", "study")}
        log.info("context head on %s: study AUC %s, recall %s, specificity %s", name,
                 figures["study"]["auc"], figures["study"]["recall"], figures["study"]["specificity"])
    report["seconds"] = round(time.perf_counter() - started, 1)
    return head, report


def main(argv=None) -> int:
    """`python -m training.context --model DIR --data DIR [--heldout DIR ...]`: train and
    measure the head for an existing artifact, on the same study split its training used."""
    import argparse
    import json
    import sys
    from pathlib import Path

    from ich.model import load_artifact
    from training.data import Decoder, dataset, read_trainset, slice_headers, split
    from training.studies import candidates

    p = argparse.ArgumentParser(prog="python -m training.context", description=main.__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="artifact folder")
    p.add_argument("--data", required=True, type=Path, help="the RSNA-layout folder it was trained on")
    p.add_argument("--heldout", type=Path, action="append", default=[], metavar="DIR")
    p.add_argument("--split", default="study", choices=("study", "slice"))
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--out", type=Path, help="write the JSON report here too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, card = load_artifact(args.model)

    def from_dicom(slices):
        return dataset(slices, Decoder(slices.paths, card.input_size), 32, training=False)

    slices = read_trainset(args.data)
    headers = slice_headers(slices.paths)
    train, calib, test = split(slices, args.split, headers.studies)
    parts = {name: (slices.take(rows), headers.take(rows), from_dicom(slices.take(rows)))
             for name, rows in (("train", train), ("calibration", calib), ("test", test))}
    for folder in args.heldout:
        held = read_trainset(folder)
        parts[f"heldout:{folder.name}"] = (held, slice_headers(held.paths), from_dicom(held))
    _, report = measure(model, parts, args.target_recall, candidates("auto"), epochs=args.epochs)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
