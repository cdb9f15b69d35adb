"""The prepared-slice cache: every slice decoded once by `ich.imaging`, then streamed to training.

`python -m training.prepare` writes it (training/prepare.py); training reads it with a `tf.data`
pipeline in which no Python runs per image: one positional read per slice of a batch, then
HU augmentation, windowing and geometric augmentation as TensorFlow ops.

What is stored is HU at the model's input size, float16, not the three windows as uint8: HU
augmentation (scanner calibration, kernel, noise; issue 12) must act before windowing, and a
float16 HU image is 2 bytes a pixel against 3 (98 KiB per 224² slice; the RSNA training set's
752,803 slices ≈ 74 GB). float16 resolves HU to 1/16 between 64 and 128 HU and 1/8 up to 256,
so windowed pixels differ from the worker's by < 0.001 (tested).

Layout of a cache folder:

    cache.json                format, input size, preprocessing version, label-file digest,
                              shard size, counts; "complete" once every shard is written
    manifest.csv              one row per listed slice, in label-file order: image id, study,
                              series, z, instance number, decoded or why not, the six labels
    shards/shard-00000.npy    (n, S, S) float16: data-set row i is shard i // shard_size,
                              offset i % shard_size (a slice that failed to decode is zeros)
    shards/shard-00000.json   that shard's headers and failures; written last, it marks the
                              shard done, so an interrupted prepare resumes after it
"""
from __future__ import annotations

import csv
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ich.imaging import PREPROCESSING_VERSION
from ich.labels import LABELS
from training.data import DataError, Headers, Slices

FORMAT = 1
META_FILE, MANIFEST_FILE, SHARD_DIR = "cache.json", "manifest.csv", "shards"
DTYPE = np.float16
MANIFEST_FIELDS = ("image_id", "study_instance_uid", "series_instance_uid", "position_z",
                   "instance_number", "ok", "reason", "source", *LABELS)


class CacheError(DataError):
    """A cache that cannot be used as asked (another input size, another label file, not
    finished); the message names the folder and what differs."""


def is_cache(path) -> bool:
    return (Path(path) / META_FILE).is_file()


def shard_path(root: Path, index: int, suffix: str = ".npy") -> Path:
    return Path(root) / SHARD_DIR / f"shard-{index:05d}{suffix}"


def read_meta(root: Path) -> dict:
    try:
        meta = json.loads((Path(root) / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"{root}: not a readable prepared cache ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CacheError(f"{root}: cache format {meta.get('format')} is not {FORMAT}; prepare it again")
    return meta


def check_meta(root: Path, meta: dict, input_size: int | None = None) -> None:
    """One-line refusals, before any long work."""
    if input_size is not None and int(meta["input_size"]) != int(input_size):
        raise CacheError(f"{root} was prepared at input size {meta['input_size']}, not {input_size}: "
                         f"prepare another cache (python -m training.prepare --input-size {input_size})")
    if meta.get("preprocessing_version") != PREPROCESSING_VERSION:
        raise CacheError(f"{root} was prepared by ich.imaging preprocessing version "
                         f"{meta.get('preprocessing_version')}, this code is {PREPROCESSING_VERSION}: "
                         "prepare it again, or training and serving would differ")


@dataclass
class SliceCache:
    """An opened cache: the decodable slices (`slices`, with their cache `rows`), their
    headers, the failures, and reads of HU by row."""

    root: Path
    meta: dict
    slices: Slices           # decodable slices only, labels from the manifest
    headers: Headers         # aligned with `slices`
    failures: dict[str, str]     # image id → reason (SliceError reason, or "missing")

    @classmethod
    def open(cls, root, input_size: int | None = None) -> "SliceCache":
        root = Path(root)
        meta = read_meta(root)
        check_meta(root, meta, input_size)
        if not meta.get("complete"):
            raise CacheError(f"{root} is not complete: run python -m training.prepare again to finish it")
        ids, paths, labels, rows, studies, series, z, inst, failures = [], [], [], [], [], [], [], [], {}
        try:
            with open(root / MANIFEST_FILE, newline="") as f:
                for row, rec in enumerate(csv.DictReader(f)):
                    if rec["ok"] != "1":
                        failures[rec["image_id"]] = rec["reason"]
                        continue
                    ids.append(rec["image_id"])
                    paths.append(rec["source"])
                    labels.append([float(rec[label]) for label in LABELS])
                    rows.append(row)
                    studies.append(rec["study_instance_uid"])
                    series.append(rec["series_instance_uid"])
                    z.append(_float(rec["position_z"]))
                    inst.append(_float(rec["instance_number"]))
        except (OSError, KeyError, ValueError) as exc:
            raise CacheError(f"{root / MANIFEST_FILE}: unreadable manifest ({exc})") from None
        slices = Slices(np.array(ids, dtype=str), np.array(paths, dtype=str),
                        np.array(labels, np.float32).reshape(-1, len(LABELS)),
                        rows=np.array(rows, np.int64))
        headers = Headers(np.array(studies, dtype=str), np.array(series, dtype=str),
                          np.array(z, np.float64), np.array(inst, np.float64))
        return cls(root, meta, slices, headers, failures)

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    def report(self) -> dict:
        """What failed to decode, in the form `training.data.Decoder.report` gives."""
        reasons: dict[str, int] = {}
        for reason in self.failures.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        return {"skipped": len(self.failures), "reasons": reasons,
                "examples": sorted(self.failures)[:10]}

    # ------------------------------------------------------------------ reads

    def __post_init__(self) -> None:
        self._fds: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._row_bytes = self.input_size ** 2 * np.dtype(DTYPE).itemsize

    def _shard(self, index: int) -> tuple[int, int]:
        """(file descriptor, byte offset of row 0) of a shard, opened once."""
        fd = self._fds.get(index)
        if fd is None:
            with self._lock:
                fd = self._fds.get(index)
                if fd is None:
                    path = shard_path(self.root, index)
                    with open(path, "rb") as f:
                        version = np.lib.format.read_magic(f)
                        header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                  else np.lib.format.read_array_header_2_0)
                        shape, _, dtype = header(f)
                        offset = f.tell()
                    if tuple(shape[1:]) != (self.input_size, self.input_size) or dtype != DTYPE:
                        raise CacheError(f"{path}: shard of shape {shape} {dtype}, expected "
                                         f"(n, {self.input_size}, {self.input_size}) float16")
                    fd = self._fds[index] = (os.open(path, os.O_RDONLY), offset)
        return fd

    def read(self, rows) -> np.ndarray:
        """HU (n, S, S) float16 of cache rows, by positional reads (no mapping: the page cache
        never counts in this process's memory); consecutive rows are read in one call."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        size, shard_size = self.input_size, int(self.meta["shard_size"])
        out = np.empty((len(rows), size, size), DTYPE)
        view = out.reshape(len(rows), -1).view(np.uint8)
        i = 0
        while i < len(rows):
            shard, offset = divmod(int(rows[i]), shard_size)
            j = i + 1     # extend over consecutive rows of the same shard
            while j < len(rows) and rows[j] == rows[j - 1] + 1 and rows[j] // shard_size == shard:
                j += 1
            fd, base = self._shard(shard)
            want = (j - i) * self._row_bytes
            data = os.pread(fd, want, base + offset * self._row_bytes)
            if len(data) != want:
                raise CacheError(f"{shard_path(self.root, shard)} is truncated")
            view[i:j] = np.frombuffer(data, np.uint8).reshape(j - i, -1)
            i = j
        return out

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()

    # ------------------------------------------------------------------ tf.data

    def batches(self, slices: Slices, batch_size: int, *, training: bool, seed: int = 0,
                augment: float = 0.0, hu_augment=None, positive_fraction: float | None = None,
                shard: tuple[int, int] = (1, 0), raw: bool = False, mixup: float = 0.0,
                groups=None, size: int | None = None):
        """A tf.data pipeline over `slices` (rows of this cache).

        Training: reshuffled every epoch, repeated forever, full batches only, positive
        oversampling as `training.data.dataset` does it, or study-balanced with `groups` (the
        study of each of `slices`; one input pipeline only), HU augmentation (a
        `training.data.HUAugment`) then windows then `mixup` (α; 0: off) then geometric
        augmentation, then shrunk to `size`² (progressive resizing; None: the cache's size);
        yields (images, labels). `raw`: yields (float16 HU, labels) and leaves augmentation,
        windows and `size` to the training step, on the accelerator
        (`training.data.DevicePreprocess`): the host then only reads. `shard` (count, index):
        this input pipeline's share of the rows, one per worker under a multi-worker strategy.
        Otherwise: in order, once; yields (windowed images, positions in `slices`).
        """
        import tensorflow as tf

        from training.data import augmenter, index_dataset, mixup as mix, shrink, tf_windows

        if slices.rows is None:
            raise ValueError("these slices are not rows of a prepared cache")
        stored, rows = self.input_size, np.asarray(slices.rows, np.int64)
        labels = tf.constant(slices.labels, tf.float32)

        def read(positions, dtype=tf.float32):
            hu = tf.numpy_function(lambda p: self.read(rows[p]), [positions], tf.float16,
                                   stateful=False)
            hu.set_shape((None, stored, stored))
            return tf.cast(hu, dtype)

        count, index = shard
        if groups is not None and (len(groups) != len(slices) or count > 1):
            # sharding by row stride would balance each shard over the studies it happens to hold
            raise ValueError("groups must give the study of each of the slices, on one input pipeline")
        positions = np.arange(len(rows))[index::count]
        ds = index_dataset(slices.labels[positions, -1] > 0.5, training, seed + index,
                           positive_fraction, None if groups is None else np.asarray(groups)[positions]
                           ).map(lambda i: tf.gather(positions, i))
        if not training:
            return (ds.batch(batch_size)
                    .map(lambda p: (tf_windows(read(p)), p), num_parallel_calls=tf.data.AUTOTUNE)
                    .prefetch(tf.data.AUTOTUNE))
        ds = ds.batch(batch_size, drop_remainder=True)
        if raw:
            return (ds.map(lambda p: (read(p, tf.float16), tf.gather(labels, p)),
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                    .prefetch(tf.data.AUTOTUNE))
        ds = ds.enumerate()

        def load(step, p):
            hu, y = read(p), tf.gather(labels, p)
            batch_seed = tf.stack([tf.constant(seed + index, tf.int64), step])
            if hu_augment is not None:
                hu = hu_augment.tf(hu, batch_seed)
            if mixup:
                return mix(tf_windows(hu), y, mixup, batch_seed)
            return tf_windows(hu), y

        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if augment:
            layer = augmenter(seed + index, augment)
            ds = ds.map(lambda x, y: (layer(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
        if size is not None and size != stored:
            ds = ds.map(lambda x, y: (shrink(x, size), y), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)


def _float(text: str) -> float:
    try:
        return float(text) if text != "" else float("nan")
    except ValueError:
        return float("nan")
