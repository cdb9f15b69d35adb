"""RSNA-layout data: the label table, the train/calibration/test split, augmentation, and the
DICOM input pipeline used to score folders.

Training reads a prepared cache (`training.cache`, written by `python -m training.prepare`
with `ich.imaging.load_hu`, the function the worker calls, so training and serving cannot
drift); folders are scored straight from DICOM by `Decoder` + `dataset`. A slice that cannot be
decoded is skipped and reported, never turned into a black image labelled "no bleed" as the
RSNA baseline did. Augmentation runs on whole batches in TensorFlow.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ich.imaging import SliceError, load_slice
from ich.labels import LABELS

log = logging.getLogger(__name__)

TRAIN_CSV = "stage_2_train.csv"
TRAIN_DIR = "stage_2_train"
SPLIT_SEED = 42          # the reference's ShuffleSplit random_state, kept for parity
N_SPLITS, TEST_SIZE = 3, 0.2


class DataError(ValueError):
    """A label file or data folder that cannot be trained on; the message says where."""


@dataclass(frozen=True)
class Slices:
    """One row per image: the project's stand-in for the reference's DataFrame."""

    ids: np.ndarray          # (n,) image ids "ID_<hex>"
    paths: np.ndarray        # (n,) DICOM file paths
    labels: np.ndarray       # (n, 6) float32 in LABELS order
    rows: np.ndarray | None = None   # (n,) rows of a prepared cache (training.cache), if any

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index) -> "Slices":
        index = np.asarray(index)
        return Slices(self.ids[index], self.paths[index], self.labels[index],
                      None if self.rows is None else self.rows[index])

    def prevalence(self) -> np.ndarray:
        return self.labels.mean(axis=0) if len(self) else np.zeros(len(LABELS), np.float32)


@dataclass(frozen=True)
class Trainset(Slices):
    """`Slices` plus what reading the label file found: duplicate rows and absent images."""

    duplicates: int = 0                              # repeated (image, label) rows dropped
    conflicts: list[str] = field(default_factory=list)    # images whose duplicates disagreed
    incomplete: list[str] = field(default_factory=list)   # images without all six labels
    missing: list[str] = field(default_factory=list)      # images listed but not on disk

    def report(self) -> dict:
        return {"images": len(self), "duplicate_rows_dropped": self.duplicates,
                "conflicting_duplicates": len(self.conflicts), "incomplete": len(self.incomplete),
                "missing_on_disk": len(self.missing), "missing_examples": self.missing[:10]}


def read_trainset(path, image_dir=None) -> Trainset:
    """`stage_2_train.csv` (or its folder) → one row per image with its six labels.

    Rows are `ID_<hex>_<label>,0|1`. Duplicate rows (the real CSV has some) are dropped; images
    whose duplicates disagree keep their first value and are reported; images without all six
    labels, or without a file in `image_dir` (default: `stage_2_train/` beside the CSV), are
    reported and left out.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TRAIN_CSV
    image_dir = Path(image_dir) if image_dir else path.parent / TRAIN_DIR
    table, duplicates, conflicts = _read_label_rows(path)
    on_disk = _listdir(image_dir)
    keep, incomplete, missing = [], [], []
    for image, labels in table.items():
        if len(labels) != len(LABELS):
            incomplete.append(image)
        elif f"{image}.dcm" not in on_disk:
            missing.append(image)
        else:
            keep.append(image)
    if missing:
        log.warning("%d images listed in %s are not in %s (e.g. %s)", len(missing), path.name,
                    image_dir, ", ".join(missing[:3]))
    if incomplete:
        log.warning("%d images lack some of the six labels; left out", len(incomplete))
    ids = np.array(keep, dtype=str)
    return Trainset(
        ids=ids,
        paths=np.array([str(image_dir / f"{i}.dcm") for i in keep], dtype=str),
        labels=np.array([[table[i][label] for label in LABELS] for i in keep],
                        dtype=np.float32).reshape(-1, len(LABELS)),
        duplicates=duplicates, conflicts=conflicts, incomplete=incomplete, missing=missing)


def _read_label_rows(path: Path) -> tuple[dict[str, dict[str, int]], int, list[str]]:
    table: dict[str, dict[str, int]] = {}
    duplicates, conflicts = 0, []
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["ID", "Label"]:
                raise DataError(f"{path}: expected the header ID,Label, found {header}")
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                image, label, value = _parse_row(path, line, row)
                labels = table.setdefault(image, {})
                if label in labels:
                    duplicates += 1
                    if labels[label] != value and image not in conflicts:
                        conflicts.append(image)
                    continue
                labels[label] = value
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:   # a gzip, UTF-16 or binary file
        raise DataError(f"{path} is not a CSV label file ({type(exc).__name__}: {exc})") from None
    if conflicts:
        log.warning("%d images have duplicate rows that disagree; kept the first", len(conflicts))
    return table, duplicates, conflicts


def _parse_row(path: Path, line: int, row: list[str]) -> tuple[str, str, int]:
    try:
        image, label = row[0].rsplit("_", 1)
        value = int(float(row[1]))
    except (ValueError, IndexError):
        raise DataError(f"{path}:{line}: expected ID_<hex>_<label>,0|1, found {row}") from None
    if label not in LABELS or value not in (0, 1):
        raise DataError(f"{path}:{line}: unknown label or value in {row}")
    return image, label, value


def _listdir(folder: Path) -> set[str]:
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries}
    except OSError as exc:
        raise DataError(f"cannot list images in {folder}: {exc}") from None


# ----------------------------------------------------------------------------- split


def split(slices: Slices, mode: str = "study", studies: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, calibration and test row indices (≈ 60 / 20 / 20).

    Test is the first fold of the reference's three `ShuffleSplit` folds (`slice`), or of the
    same on whole studies (`study`, `GroupShuffleSplit` on StudyInstanceUID: slices of one head
    on both sides inflate every figure). Calibration is a quarter of the rest, drawn the same
    way: the best epoch, the study rule and its thresholds are chosen on it, and the figures a
    model card reports come from test studies that chose nothing (DESIGN §7).
    `studies`: the StudyInstanceUID per row, if already read (`slice_headers`).
    """
    from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit

    if mode not in ("slice", "study"):
        raise ValueError(f"split mode must be slice or study, not {mode!r}")
    groups = None
    if mode == "study":
        groups = np.asarray(studies) if studies is not None else study_uids(slices.paths)
        splitter, inner = (GroupShuffleSplit(n_splits=N_SPLITS, test_size=TEST_SIZE, random_state=SPLIT_SEED),
                           GroupShuffleSplit(n_splits=1, test_size=0.25, random_state=SPLIT_SEED))
    else:
        splitter, inner = (ShuffleSplit(n_splits=N_SPLITS, test_size=TEST_SIZE, random_state=SPLIT_SEED),
                           ShuffleSplit(n_splits=1, test_size=0.25, random_state=SPLIT_SEED))
    rest, test = next(splitter.split(slices.ids, groups=groups))
    if len(rest) < 2:
        raise DataError(f"{len(slices)} images are too few to split into train, calibration and test")
    rest_groups = None if groups is None else groups[rest]
    train, calibration = next(inner.split(rest, groups=rest_groups))
    return rest[train], rest[calibration], test


@dataclass(frozen=True)
class Headers:
    """Where each slice lies: study, series, position and instance number, from its header.
    The study rule orders neighbours by `position`; evaluation replays arrival in `instance`
    order, the order a scanner or PACS sends a series in."""

    studies: np.ndarray      # (n,) StudyInstanceUID ("unreadable:<path>" for a broken header)
    series: np.ndarray       # (n,) SeriesInstanceUID
    positions: np.ndarray    # (n,) z of ImagePositionPatient in mm, NaN where absent
    instances: np.ndarray    # (n,) InstanceNumber, NaN where absent

    def take(self, index) -> "Headers":
        index = np.asarray(index)
        return Headers(self.studies[index], self.series[index], self.positions[index],
                       self.instances[index])


def slice_headers(paths) -> Headers:
    """Read the four header fields of every file (no pixels). A file whose header cannot be
    read becomes a study of its own (the pipeline will skip and report it)."""
    import pydicom

    studies, series, positions, instances = [], [], [], []
    tags = ["StudyInstanceUID", "SeriesInstanceUID", "ImagePositionPatient", "InstanceNumber"]
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
            studies.append(str(ds.StudyInstanceUID))
        except Exception:  # noqa: BLE001 — any unreadable header: its own group
            studies.append(f"unreadable:{path}")
            series.append("")
            positions.append(math.nan)
            instances.append(math.nan)
            continue
        series.append(str(ds.get("SeriesInstanceUID", "")))
        positions.append(_number(lambda: ds.ImagePositionPatient[2]))
        instances.append(_number(lambda: ds.InstanceNumber))
    return Headers(np.array(studies, dtype=str), np.array(series, dtype=str),
                   np.array(positions, np.float64), np.array(instances, np.float64))


def _number(read) -> float:
    try:
        value = read()
        return math.nan if value is None or value == "" else float(value)
    except Exception:  # noqa: BLE001 — absent or malformed: unknown
        return math.nan


def study_uids(paths) -> np.ndarray:
    """StudyInstanceUID of each file, from the header only (see `slice_headers`)."""
    return slice_headers(paths).studies


# ----------------------------------------------------------------------------- pipeline


#: HU-space augmentations (`HUAugment`), in the order they are applied.
HU_AUGMENTS = ("calibration", "kernel", "noise")
#: Taps either side of the Gaussian kernels (scipy's truncate=4 at the largest sigma, 1.2 px).
BLUR_RADIUS = 5


@dataclass(frozen=True)
class HUAugment:
    """What differs between scanners, applied to a batch of slices' HU before windowing, where
    it happens (after windowing, a 6 HU calibration error is a brightness change the clip hides
    in one window and not another). Each op runs on half of the slices, drawn per slice:

    - `calibration`: HU x U(0.98, 1.02) + U(-4, 4) (water drifts a few HU between scanners);
    - `kernel`: Gaussian blur sigma U(0.3, 1.0) px, or unsharp masking of gain U(0.2, 0.8)
      over sigma 1 px (soft to sharp reconstruction kernels);
    - `noise`: Gaussian noise of SD U(0.5, 3) HU at the input size, white or correlated over
      U(0.5, 1.2) px (dose and noise texture).

    TensorFlow ops with stateless randomness (`tf(hu, seed)`): the same seed gives the same
    batch, and nothing runs in Python per image.
    Measured (docs/training.md, "Sites"): widening `kernel` to gain 1.0 and `noise` to 5 HU
    over 1.5 px made the held-out figures worse, not better.
    """

    ops: tuple[str, ...] = HU_AUGMENTS

    def __post_init__(self):
        unknown = set(self.ops) - set(HU_AUGMENTS)
        if unknown:
            raise ValueError(f"unknown HU augmentations {sorted(unknown)}; expected from {HU_AUGMENTS}")

    def tf(self, hu, seed):
        """(B, S, S) float32 HU, a (2,) int64 seed → augmented HU of the same shape."""
        import tensorflow as tf

        n = tf.shape(hu)[0]
        seeds = iter(tf.unstack(tf.random.experimental.stateless_split(seed, 16)))

        def uniform(lo, hi):
            return tf.random.stateless_uniform([n], next(seeds), lo, hi)

        def half():
            return uniform(0.0, 1.0) < 0.5

        def per_slice(v):
            return v[:, None, None]

        if "calibration" in self.ops:
            on = half()
            scale, offset = uniform(0.98, 1.02), uniform(-4.0, 4.0)
            hu = hu * per_slice(tf.where(on, scale, 1.0)) + per_slice(tf.where(on, offset, 0.0))
        if "kernel" in self.ops:
            on, blur = half(), half()
            sigma = tf.where(blur, uniform(0.3, 1.0), 1.0)
            gain = tf.where(on, tf.where(blur, -1.0, uniform(0.2, 0.8)), 0.0)
            # blur: hu - (hu - G*hu) = G*hu; unsharp: hu + g (hu - G*hu); off: g = 0
            hu = hu + per_slice(gain) * (hu - gaussian_blur(hu, sigma))
        if "noise" in self.ops:
            on, correlated = half(), half()
            sd, sigma = uniform(0.5, 3.0), tf.where(correlated, uniform(0.5, 1.2), 0.0)
            noise = gaussian_blur(tf.random.stateless_normal(tf.shape(hu), next(seeds)), sigma,
                                  mode="REFLECT")
            noise /= tf.maximum(tf.math.reduce_std(noise, axis=[1, 2], keepdims=True), 1e-6)
            hu = hu + per_slice(tf.where(on, sd, 0.0)) * noise
        return hu


def gaussian_blur(x, sigma, mode: str = "SYMMETRIC"):
    """Per-slice Gaussian blur of (B, H, W) by sigma (B,) pixels (0: unchanged), separable,
    one depthwise convolution pair for the whole batch (the batch becomes the channels)."""
    import tensorflow as tf

    taps = tf.range(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=tf.float32)
    s = tf.maximum(sigma, 1e-3)[:, None]
    k = tf.exp(-0.5 * tf.square(taps[None, :] / s))
    delta = tf.cast(tf.equal(taps, 0.0), tf.float32)[None, :]
    k = tf.where((sigma > 0)[:, None], k / tf.reduce_sum(k, axis=1, keepdims=True), delta)  # (B, T)
    k = tf.transpose(k)                                                    # (T, B)
    x = tf.transpose(x, [1, 2, 0])[None]                                   # (1, H, W, B)
    r = BLUR_RADIUS
    x = tf.pad(x, [[0, 0], [r, r], [r, r], [0, 0]], mode=mode)
    x = tf.nn.depthwise_conv2d(x, k[:, None, :, None], [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, k[None, :, :, None], [1, 1, 1, 1], "VALID")
    return tf.transpose(x[0], [2, 0, 1])


def hu_augment(names: str | None) -> HUAugment | None:
    """"calibration,kernel,noise" (or "all") → HUAugment; "none" or empty → None."""
    if not names or names == "none":
        return None
    ops = HU_AUGMENTS if names == "all" else tuple(n.strip() for n in names.split(",") if n.strip())
    return HUAugment(ops)


def tf_windows(hu):
    """(..., S, S) HU → (..., S, S, 3) windows in [0, 1]: `ich.imaging.windows` in TensorFlow,
    the same float32 arithmetic on the same bounds."""
    import tensorflow as tf

    from ich.imaging import window_bounds

    lows, widths = window_bounds()
    return tf.clip_by_value((hu[..., None] - lows) / widths, 0.0, 1.0)


class Decoder:
    """Index → windowed image via `ich.imaging.load_slice` (exactly what the worker computes),
    thread-safe, recording the slices it skips. Scores DICOM folders; training reads a
    prepared cache instead."""

    def __init__(self, paths, size: int) -> None:
        self.paths, self.size = list(paths), size
        self.skipped: dict[str, str] = {}      # path → SliceError reason (or "missing")
        self._lock = threading.Lock()

    def __call__(self, index) -> tuple[np.ndarray, bool]:
        path = self.paths[int(index)]
        try:
            return load_slice(path, self.size), True
        except SliceError as exc:
            return self._skip(path, exc.reason)
        except FileNotFoundError:
            return self._skip(path, "missing")

    def _skip(self, path: str, reason: str) -> tuple[np.ndarray, bool]:
        with self._lock:
            if path not in self.skipped:
                log.warning("skipping %s: %s", path, reason)
            self.skipped[path] = reason
        return np.zeros((self.size, self.size, 3), np.float32), False

    def report(self) -> dict:
        reasons: dict[str, int] = {}
        for reason in self.skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        return {"skipped": len(self.skipped), "reasons": reasons,
                "examples": sorted(os.path.basename(p) for p in self.skipped)[:10]}


def augmenter(seed: int, scale: float = 1.0):
    """Cheap, label-preserving batch augmentation: left-right flip (heads are near-symmetric),
    ±6° rotation, ±6 % shift and ±8 % zoom, each range × `scale` (`--augment-scale`), filling
    with 0 (air in every window)."""
    import keras

    fill = {"fill_mode": "constant", "fill_value": 0.0}
    scale = float(scale)
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(scale * 6 / 360, seed=seed + 1, **fill),
        keras.layers.RandomTranslation(scale * 0.06, scale * 0.06, seed=seed + 2, **fill),
        keras.layers.RandomZoom(min(scale * 0.08, 0.9), seed=seed + 3, **fill),
    ], name="augment")


def mixup(images, labels, alpha: float, seed):
    """Mixup (Zhang et al., ICLR 2018): each image of the batch blended with its neighbour in
    the (shuffled) batch, λ·x_i + (1−λ)·x_{i−1}, and its labels alike, λ ~ Beta(α, α) folded to
    ≥ 0.5 so every image stays mostly itself. A small folder is memorised within a few passes;
    mixed pairs are new every step. The labels' mean is unchanged, so the sampler's prior
    correction still holds. `seed`: a stateless seed pair (the batch's own)."""
    import tensorflow as tf

    n = tf.shape(images)[0]
    seeds = [tf.random.experimental.stateless_fold_in(seed, k) for k in (1001, 1002)]
    g, h = (tf.random.stateless_gamma([n], s, alpha) for s in seeds)
    lam = tf.maximum(g / (g + h), 1.0 - g / (g + h))
    lam = tf.where(tf.math.is_finite(lam), lam, tf.ones_like(lam))   # 0/0 when both draws are 0

    def mix(x):
        w = tf.reshape(tf.cast(lam, x.dtype), [-1] + [1] * (len(x.shape) - 1))
        return w * x + (1 - w) * tf.roll(x, 1, axis=0)

    return mix(images), mix(labels)


def shrink(images, size: int):
    """(B, S, S, C) windows → (B, size, size, C): progressive resizing's early epochs train on
    the augmented images downscaled, antialiased so a thin bleed is averaged, not skipped."""
    import tensorflow as tf

    return tf.image.resize(images, (size, size), antialias=True)


class DevicePreprocess:
    """The training step's own input stage when augmentation runs on the accelerator
    (`--augment-on device`): float16 HU batches from the cache → `HUAugment` → windows →
    `mixup` → `augmenter`, the host pipeline's ops and ranges in the same order, inside the
    compiled step. The host then only reads shards: 28.7× the per-core DICOM decode rate
    against 0.5× with the augmentation on the CPU (docs/training.md, "At scale").

    HU augmentation and mixup are seeded by (seed, optimizer step, replica) as the host
    pipeline seeds them by (seed, batch number); the geometric layers keep their own seed
    generators."""

    def __init__(self, seed: int, hu_augment: "HUAugment | None", augment: float, size: int,
                 mixup: float = 0.0) -> None:
        self.seed, self.hu_augment, self.mixup, self.size = seed, hu_augment, mixup, size
        self.layer = augmenter(seed, augment) if augment else None
        if self.layer is not None:
            self.layer.build((None, size, size, 3))   # its variables now, not while tracing

    def __call__(self, hu, step, labels=None, size: int | None = None):
        """(B, S, S) HU of any float dtype, the step (int) → (B, S, S, 3) float32 windows;
        with `labels`, (windows, labels), mixed as the host pipeline mixes them (`mixup`).
        `size`: shrink the augmented windows to size² (progressive resizing)."""
        import tensorflow as tf

        hu = tf.cast(hu, tf.float32)
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:   # each its own draws
            seed = tf.random.experimental.stateless_fold_in(seed, replica.replica_id_in_sync_group)
        if self.hu_augment is not None:
            hu = self.hu_augment.tf(hu, seed)
        images = tf_windows(hu)
        if labels is not None and self.mixup:
            images, labels = mixup(images, tf.cast(labels, tf.float32), self.mixup, seed)
        if self.layer is not None:
            images = self.layer(images, training=True)
        if size is not None:
            images = shrink(images, size)
        return images if labels is None else (images, labels)

    def xla_compiles(self) -> bool:
        """Whether XLA compiles these ops on the default device, tried on a 2-slice batch.
        The geometric layers lower to ImageProjectiveTransformV3 and mixup to a gamma draw,
        neither of which has an XLA kernel in TensorFlow 2.21 (tensorflow#100865); a step
        that holds them fails at its first trace when compiled with XLA, which Keras'
        `jit_compile="auto"` does on any GPU."""
        import tensorflow as tf

        step = tf.function(lambda hu, labels: self(hu, 0, labels), jit_compile=True)
        try:
            step(tf.zeros((2, self.size, self.size), tf.float16), tf.zeros((2, len(LABELS))))
        except tf.errors.InvalidArgumentError as exc:   # "tf2xla conversion failed ..."
            log.info("XLA cannot compile the device augmentation: %s", str(exc).splitlines()[0][:200])
            return False
        return True


def positive_odds_ratio(slices: Slices, positive_fraction: float | None) -> float:
    """How much `positive_fraction` sampling multiplies a slice's odds of being `any`-positive
    (per-slice sampling weight of positives ÷ that of negatives); 1.0 for natural sampling."""
    positives = int(slices.labels[:, -1].sum())
    if positive_fraction is None or positives in (0, len(slices)):
        return 1.0
    return positive_fraction * (len(slices) - positives) / ((1 - positive_fraction) * positives)


#: Positive positions drawn ahead for study-balanced sampling before the stream repeats in
#: the same order (the 800-study recipe draws about 13,000 positives in all; a full RSNA run
#: would cycle it a few times).
BALANCED_DRAWS = 1 << 17


def study_balanced(rows, groups, seed: int, draws: int = BALANCED_DRAWS) -> np.ndarray:
    """`draws` of `rows` with replacement, each group (study) drawn equally often and its rows
    alike within it: a 3-slice bleed is seen as often as a 20-slice one."""
    rows, groups = np.asarray(rows, np.int64), np.asarray(groups)
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return np.random.default_rng(seed).choice(rows, size=draws, p=weights / weights.sum())


def index_dataset(positive, training: bool, seed: int = 0, positive_fraction: float | None = None,
                  groups=None):
    """Positions 0..n-1 (n = len(positive)) in the order a pipeline reads them.

    Training: reshuffled every epoch and repeated forever (use steps_per_epoch); with
    `positive_fraction`, that share is drawn from the `any`-positive positions (rare bleeds
    are seen more often within a fixed step budget; the trainer undoes the prior shift, see
    `positive_odds_ratio`), unless all or none are positive; with `groups` (the study of each
    position, `--positive-sampling study`) too, those draws are `study_balanced`.
    Otherwise: in order, once."""
    import tensorflow as tf

    positive = np.asarray(positive, bool)

    def shuffled(rows, offset=0):
        return (tf.data.Dataset.from_tensor_slices(np.asarray(rows, np.int64))
                .shuffle(len(rows), seed=seed + offset, reshuffle_each_iteration=True).repeat())

    if training and positive_fraction is not None and 0 < positive.sum() < len(positive):
        rows = np.flatnonzero(positive)
        bleeding = shuffled(rows) if groups is None else tf.data.Dataset.from_tensor_slices(
            study_balanced(rows, np.asarray(groups)[rows], seed)).repeat()
        return tf.data.Dataset.sample_from_datasets(
            [bleeding, shuffled(np.flatnonzero(~positive), 1)],
            weights=[positive_fraction, 1 - positive_fraction], seed=seed)
    if training:
        return shuffled(np.arange(len(positive)))
    return tf.data.Dataset.range(len(positive))


def dataset(slices: Slices, decoder: Decoder, batch_size: int, *, training: bool,
            seed: int = 0, augment: float = 0.0, workers: int = 2,
            positive_fraction: float | None = None):
    """A tf.data pipeline straight from DICOM: parallel decode → drop skipped slices → batch.

    Training (benchmarks only: `python -m training` reads a prepared cache): as
    `index_dataset`, full batches (a 3-image batch would upset BatchNorm), augmented;
    yields (images, labels). Otherwise: in order, once, yielding `(image, row index)` so
    predictions can be matched to labels after skips.
    """
    import tensorflow as tf

    size = decoder.size
    labels = tf.constant(slices.labels, tf.float32)

    def decode(index):
        image, ok = tf.numpy_function(decoder, [index], [tf.float32, tf.bool], stateful=False)
        image.set_shape((size, size, 3))
        ok.set_shape(())
        return image, ok, index

    ds = index_dataset(slices.labels[:, -1] > 0.5, training, seed, positive_fraction)
    ds = ds.map(decode, num_parallel_calls=workers, deterministic=True)
    ds = ds.filter(lambda image, ok, index: ok)
    if training:
        ds = ds.map(lambda image, ok, index: (image, tf.gather(labels, index)))
        ds = ds.batch(batch_size, drop_remainder=True)
        if augment:
            layer = augmenter(seed, augment)
            ds = ds.map(lambda x, y: (layer(x, training=True), y))
    else:
        ds = ds.map(lambda image, ok, index: (image, index)).batch(batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)
