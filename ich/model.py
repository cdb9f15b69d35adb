"""The model and its artifact: what training writes and what workers load (DESIGN §3).

An artifact is a folder `models/<version>/` holding `model.keras` and `model.json` (the model
card: labels in order, input size, windows, the study rule and its thresholds, metrics, training
data). `models/current`
is a symlink to the version in service; `promote()` swaps it atomically.

The network takes the windowed image of `ich.imaging` in [0, 1]; the scaling each Keras engine
expects is the model's first layers, so serving code never needs to know the engine.
TensorFlow is imported lazily: importing this module (e.g. to read a card) stays cheap.
"""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ich.decision import RuleError, StudyRule
from ich.imaging import WINDOWS
from ich.labels import DEFAULT_THRESHOLDS, LABELS

if TYPE_CHECKING:
    import keras

MODEL_FILE = "model.keras"
CARD_FILE = "model.json"

# keras.applications preprocessing modes, reproduced with serialisable layers on [0, 1] input.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_SCALING = {  # engine name prefix → mode
    "Inception": "tf", "Xception": "tf", "MobileNet": "tf", "NASNet": "tf",
    "DenseNet": "torch", "ResNet": "caffe", "VGG": "caffe",
    "EfficientNet": "raw255", "ConvNeXt": "raw255", "RegNet": "raw255",
}


class ArtifactError(RuntimeError):
    """A model folder that a worker must not serve (missing file, wrong labels, bad card)."""


@dataclass
class ModelCard:
    """model.json: everything a worker or a reviewer needs to know about a model version."""

    version: str
    engine: str = "InceptionV3"
    input_size: int = 224
    labels: list[str] = field(default_factory=lambda: list(LABELS))
    windows: list[dict[str, float]] = field(
        default_factory=lambda: [w._asdict() for w in WINDOWS])
    # Per label, on the study score of `study_rule` (ich.decision): what the worker applies.
    thresholds: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    # A card written before study rules existed reads as "max", which is what it did.
    study_rule: dict[str, Any] = field(default_factory=lambda: {"name": "max", "k": 1})
    slice_thresholds: dict[str, float] = field(default_factory=dict)   # reference only
    # "ok", or "failed": training's quality check found a model that learned nothing useful;
    # workers refuse it unless ICH_ALLOW_FAILED_MODEL (`verdict` says why).
    status: str = "ok"
    verdict: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    metrics: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    # How it was trained: strategy, replicas, global batch, learning rate, precision, run folder.
    training: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def validate(self) -> None:
        if list(self.labels) != list(LABELS):
            raise ArtifactError(f"model labels {self.labels} differ from {list(LABELS)}")
        if [tuple(w.values()) for w in self.windows] != [tuple(w) for w in WINDOWS]:
            raise ArtifactError(f"model windows {self.windows} differ from ich.imaging.WINDOWS")
        if self.status not in ("ok", "failed"):
            raise ArtifactError(f"status {self.status!r} is neither ok nor failed")
        if not 32 <= int(self.input_size) <= 1024:
            raise ArtifactError(f"input_size {self.input_size} out of range")
        for label, value in {**self.thresholds, **self.slice_thresholds}.items():
            if label not in LABELS or not 0 < float(value) < 1:
                raise ArtifactError(f"threshold {label}={value} is not a label probability")
        try:
            self.rule()
        except (RuleError, TypeError, ValueError) as exc:
            raise ArtifactError(f"study_rule {self.study_rule}: {exc}") from None

    def rule(self, overrides: dict[str, float] | None = None) -> StudyRule:
        """The study decision this model was calibrated for, with threshold overrides
        (ICH_THRESHOLD_<LABEL>) applied on top of the card's."""
        return StudyRule.from_card(self.study_rule, {**self.thresholds, **(overrides or {})})

    @classmethod
    def read(cls, folder: Path) -> "ModelCard":
        path = Path(folder) / CARD_FILE
        try:
            raw = json.loads(path.read_text())
            card = cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})
        except (OSError, ValueError, TypeError) as exc:
            raise ArtifactError(f"cannot read {path}: {exc}") from None
        card.validate()
        return card

    def write(self, folder: Path) -> None:
        self.validate()
        (Path(folder) / CARD_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


def build_model(engine: str = "InceptionV3", input_size: int | None = 224, weights: str | None = None,
                bn_momentum: float | None = None, flip_average: bool = False) -> "keras.Model":
    """`engine` without its top, global average pooling, Dense(6, sigmoid) in LABELS order.

    `weights`: None (from scratch, the default here: nothing can be downloaded), "imagenet"
    (Keras downloads them where the internet is reachable) or a local weights file path.
    `bn_momentum`: Keras' 0.99 suits long ImageNet runs; short runs from scratch need a lower
    value or the running statistics used at inference never settle (DESIGN §6).
    `flip_average`: test-time augmentation inside the model. The engine sees the slice and its
    left-right mirror (heads are near-symmetric; training flips too) and the head reads the
    mean of the two pooled feature vectors, which for a linear head is the mean of the two
    logits. Same weights, in the same order, as the plain model; twice the engine's work.
    `input_size` None: any square size (training with progressive resizing); the weights do
    not depend on it, so an artifact copies them into a model of its card's size.
    """
    import keras

    try:
        constructor = getattr(keras.applications, engine)
    except AttributeError:
        raise ValueError(f"unknown keras.applications engine {engine!r}") from None
    shape = (input_size, input_size, 3)
    inputs = keras.Input(shape, name="windows")
    x = _engine_scaling(engine, inputs)
    base = constructor(include_top=False, weights=weights, input_shape=shape, pooling="avg")
    if bn_momentum is not None:
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    features = base(x)
    if flip_average:
        features = keras.layers.Average(name="flip_average")([features, base(mirror_layer()(name="mirror")(x))])
    # float32 whatever the dtype policy: mixed-precision training keeps its probabilities exact
    outputs = keras.layers.Dense(len(LABELS), activation="sigmoid", name="ich", dtype="float32")(features)
    return keras.Model(inputs, outputs, name=f"ich_{engine.lower()}")


@functools.cache
def mirror_layer():
    """The MirrorLR layer class, defined (and registered with Keras) on first use: importing
    this module stays TensorFlow-free."""
    import keras

    @keras.saving.register_keras_serializable(package="ich")
    class MirrorLR(keras.layers.Layer):
        """The image mirrored left-right (axis 2 of NHWC): a fixed, serialisable layer.
        Registered when `mirror_layer()` first runs: `load_artifact` runs it before loading."""

        def call(self, x):
            return keras.ops.flip(x, axis=2)

    return MirrorLR


@functools.cache
def logit_mean_layer():
    """The LogitMean layer class (an ensemble's output, `training.ensemble`), registered with
    Keras on first use like `mirror_layer`."""
    import keras

    @keras.saving.register_keras_serializable(package="ich")
    class LogitMean(keras.layers.Layer):
        """σ(mean of logit(pᵢ)) over several models' probabilities, per label: averaging in
        logits keeps a member's confident call from being halved the way averaging
        probabilities would, and it is what docs/training.md measured. float32 whatever the
        policy, clipped away from 0 and 1 so a saturated member stays finite."""

        def __init__(self, **kwargs):
            super().__init__(**{"dtype": "float32", **kwargs})

        def call(self, inputs):
            ops = keras.ops
            p = ops.clip(ops.stack([ops.cast(x, "float32") for x in inputs], axis=0), 1e-7, 1 - 1e-7)
            return ops.sigmoid(ops.mean(ops.log(p) - ops.log1p(-p), axis=0))

    return LogitMean


def _engine_scaling(engine: str, x):
    import keras

    mode = next((m for prefix, m in _SCALING.items() if engine.startswith(prefix)), "tf")
    if mode == "tf":  # [-1, 1]
        return keras.layers.Rescaling(2.0, offset=-1.0, name="scale")(x)
    if mode == "torch":  # ImageNet mean/std on [0, 1]
        return keras.layers.Normalization(mean=_IMAGENET_MEAN,
                                          variance=[s * s for s in _IMAGENET_STD], name="scale")(x)
    if mode == "caffe":  # 0-255, ImageNet means subtracted (our channels are windows, not RGB)
        x = keras.layers.Rescaling(255.0, name="scale")(x)
        return keras.layers.Normalization(mean=_CAFFE_MEAN_BGR, variance=[1.0, 1.0, 1.0], name="caffe")(x)
    return keras.layers.Rescaling(255.0, name="scale")(x)  # engines that scale internally


def save_artifact(model: "keras.Model", card: ModelCard, root: Path) -> Path:
    """Write `root/<version>/` (model then card, so a card always describes a full model)."""
    folder = Path(root) / card.version
    folder.mkdir(parents=True, exist_ok=False)
    model.save(folder / MODEL_FILE)
    card.write(folder)
    return folder


def load_artifact(folder: Path) -> tuple["keras.Model", ModelCard]:
    """Load a model for serving; the card is checked first so a bad folder fails fast."""
    import keras

    folder = Path(folder).resolve()
    card = ModelCard.read(folder)
    if not (folder / MODEL_FILE).is_file():
        raise ArtifactError(f"{folder / MODEL_FILE} is missing")
    mirror_layer()                   # registered before any load (flip-averaged artifacts)
    logit_mean_layer()               # and ensembles
    model = keras.models.load_model(folder / MODEL_FILE, compile=False)
    if tuple(model.input_shape[1:]) != (card.input_size, card.input_size, 3):
        raise ArtifactError(f"model input {model.input_shape} ≠ card input_size {card.input_size}")
    if model.output_shape[-1] != len(LABELS):
        raise ArtifactError(f"model has {model.output_shape[-1]} outputs, expected {len(LABELS)}")
    return model, card


def promote_ok(version_folder: Path, current: Path) -> None:
    """`promote`, refusing a version whose card is not "ok" (training's quality check failed):
    the site tools (calibrate, adapt, ensemble) promote only what a worker would serve."""
    card = ModelCard.read(version_folder)
    if card.status != "ok":
        raise ArtifactError(f"{version_folder} is marked {card.status}; not promoted")
    promote(version_folder, current)


def promote(version_folder: Path, current: Path) -> None:
    """Point `current` (a symlink) at `version_folder` atomically: workers never see a gap."""
    current = Path(current)
    target = os.path.relpath(Path(version_folder).resolve(), current.parent.resolve())
    tmp = current.with_name(f".{current.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, current)
