"""The training configuration: reference defaults < recipe < `--config FILE` < command line.

One dataclass holds every knob so a run is fully described by one JSON file (`config.json`,
written next to the model). The dataclass defaults are the RSNA 2019 Keras baseline
(`MyDeepModel`: InceptionV3, 224², batch 32, Adam 3e-4, 3 epochs, decay 0.8 every 3 epochs)
except `weights` (`none`: nothing can be downloaded here), the study split and the study
operating point. Every run then applies a named recipe (`--recipe`, RECIPES), whatever the data
source: `scratch`, the recipe measured to make a from-scratch InceptionV3 learn on 2 CPU cores
(docs/training.md), unless ImageNet or other weights are given, which get `reference`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


#: How `--positive-fraction` draws its bleeding slices (training.data.index_dataset).
POSITIVE_SAMPLING = ("slice", "study")


class ConfigError(ValueError):
    """A configuration the run cannot start with; the message names the setting."""


@dataclass
class TrainConfig:
    # data
    data: str | None = None                  # RSNA-layout folder (stage_2_train.csv + stage_2_train/)
    synthetic_studies: int | None = None     # or: generate this many phantom studies
    synthetic_dir: str | None = None         # where phantoms go (default data/synthetic/<params>)
    synthetic_slices: tuple[int, int] = (24, 36)
    synthetic_site: str = "randomised"       # training.synthetic.SITES: the generator's ranges
    site_studies: int = 0                    # phantom studies of the held-out site (0: none)
    heldout: list[str] = field(default_factory=list)   # RSNA-layout folders of other sites
    operating: str | None = None             # RSNA-layout folder the operating point is chosen on
    operating_studies: int = 0               # or: phantom studies generated for it (0: calibration)
    split: str = "study"                     # study: by StudyInstanceUID | slice: ShuffleSplit (reference)
    seed: int = 42
    # model
    engine: str = "InceptionV3"
    input_size: int = 224
    early_size: int | None = None            # progressive resizing: every epoch but the last
    full_epochs: int = 3                     # `full_epochs` trains at early_size² (None: off)
    weights: str = "none"                    # none | imagenet | path to a weights file
    bn_momentum: float | None = None         # None = Keras' 0.99
    ema: float = 0.0                         # weight averaging momentum per step (0: off)
    weight_decay: float = 0.0                # AdamW's decoupled weight decay (0: Adam)
    mixup: float = 0.0                       # mixup's Beta(α, α) on training batches (0: off)
    fused_batch_norm: bool = True            # training BatchNorm on the fused kernel (same maths)
    # optimisation
    batch_size: int = 32
    learning_rate: float = 3e-4
    epochs: int = 3
    decay_rate: float = 0.8
    decay_steps: int = 3
    steps_per_epoch: int | None = None       # None = one pass over the training images; 0 = auto
    loss: str = "bce"                        # bce | weighted (RSNA weights: any counts twice)
    augment: bool = True
    augment_scale: float = 1.0               # geometric ranges × this (1: ±6°, ±6 % shift, ±8 % zoom)
    hu_augment: str = "none"                 # none | all | comma list of training.data.HU_AUGMENTS
    bn_recalibrate: int = 0                  # batches of BN statistics recomputed before validation
    validate_from: int = 1                   # first epoch validated (and eligible as best)
    positive_fraction: float | None = None   # share of `any`-positive images per batch (None: natural)
    positive_sampling: str = "slice"         # slice | study: each bleeding study drawn equally often
    # input pipeline and devices
    workers: int | None = None               # decoding processes (prepare) and threads; None = every core
    cache_dir: str | None = None             # the prepared cache of a DICOM folder (default data/cache/...)
    strategy: str = "auto"                   # training.distribute.STRATEGIES
    mixed_precision: str = "none"            # none | bf16 | fp16 | auto: bf16 where computed natively
    augment_on: str = "auto"                 # host (tf.data) | device (training step) | auto: device with a GPU
    jit_compile: str = "auto"                # on | off (XLA) | auto: XLA for long float32 runs on a CPU
    resume: str | None = None                # a run folder (<out>/runs/<version>) to continue
    platt: bool = True                       # per-label Platt scaling fitted on calibration
    flip_average: bool = False               # the artifact averages each slice with its mirror
    context: bool = False                    # also train and measure the slice-context head
    # thresholds and export
    target_recall: float | None = 0.95       # STUDY recall on calibration; None: max rule, any 0.15
    recall_confidence: float = 0.0           # ...held on new studies with this confidence (0: on average)
    gap_placement: float | None = None       # any threshold within calibration's gap (None: studies.GAP_PLACEMENT)
    slice_target_recall: float | None = 0.95  # slice-level operating points (reported, not served)
    study_rule: str = "auto"                 # auto | max | consecutive-K | topk-K
    allow_failed: bool = False               # export and promote even if the quality check fails
    recipe: str | None = None                # scratch | reference; None: by weights
    out: str = "models"
    version: str | None = None
    promote: bool = False
    verbose: int = 1

    def validate(self) -> "TrainConfig":
        if (self.data is None) == (self.synthetic_studies is None):
            raise ConfigError("give exactly one of --data DIR or --synthetic-studies N")
        from training.data import hu_augment
        from training.synthetic import SITES

        if self.synthetic_site not in SITES:
            raise ConfigError(f"--synthetic-site must be one of {', '.join(SITES)}, not {self.synthetic_site!r}")
        if self.site_studies < 0:
            raise ConfigError("--site-studies must be >= 0")
        if self.operating_studies < 0:
            raise ConfigError("--operating-studies must be >= 0")
        if self.operating and self.operating_studies:
            raise ConfigError("give one of --operating DIR or --operating-studies N")
        if self.operating_studies and self.synthetic_studies is None:
            raise ConfigError("--operating-studies generates phantoms: with --data, give "
                              "--operating DIR (the operating studies of the same site)")
        try:
            hu_augment(self.hu_augment)
        except ValueError as exc:
            raise ConfigError(f"--hu-augment: {exc}") from None
        if self.synthetic_studies is not None and self.synthetic_studies < 2:
            raise ConfigError("--synthetic-studies must be at least 2 (train and validation)")
        if self.split not in ("slice", "study"):
            raise ConfigError(f"--split must be slice or study, not {self.split!r}")
        if self.loss not in ("bce", "weighted"):
            raise ConfigError(f"loss must be bce or weighted, not {self.loss!r}")
        if self.input_size < 75:
            raise ConfigError("--input-size must be at least 75 (InceptionV3's minimum)")
        if self.early_size is not None and self.early_size < 75:
            raise ConfigError("--early-size must be at least 75 (InceptionV3's minimum)")
        for name in ("target_recall", "slice_target_recall"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in (0, 1]")
        from training.studies import candidates, check_placement

        try:
            candidates(self.study_rule)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not 0 <= self.recall_confidence < 1:
            raise ConfigError("--recall-confidence must be in [0, 1) (0: the expected-recall rank)")
        try:
            check_placement(self.gap_placement)
        except ValueError as exc:
            raise ConfigError(f"--gap-placement: {exc}") from None
        if self.positive_fraction is not None and not 0 < self.positive_fraction < 1:
            raise ConfigError("--positive-fraction must be in (0, 1)")
        if self.positive_sampling not in POSITIVE_SAMPLING:
            raise ConfigError(f"--positive-sampling must be one of {', '.join(POSITIVE_SAMPLING)}, "
                              f"not {self.positive_sampling!r}")
        if self.positive_sampling == "study" and self.positive_fraction is None:
            raise ConfigError("--positive-sampling study needs --positive-fraction F")
        if self.bn_momentum is not None and not 0 <= self.bn_momentum < 1:
            raise ConfigError("--bn-momentum must be in [0, 1)")
        if not 0 <= self.ema < 1:
            raise ConfigError("--ema must be in [0, 1) (0: no weight averaging)")
        if not 0 < self.augment_scale <= 5:   # NaN fails every comparison, so it is refused
            raise ConfigError("--augment-scale must be in (0, 5] (1: ±6°, ±6 % shift, ±8 % zoom)")
        if not all(0 <= v < math.inf for v in (self.weight_decay, self.mixup)):
            raise ConfigError("--weight-decay and --mixup must be finite and >= 0 (0: off)")
        if self.ema and not self.bn_recalibrate:
            raise ConfigError("--ema needs --bn-recalibrate N > 0: averaged weights need "
                              "BatchNorm statistics of their own")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, not {self.recipe!r}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 0:
            raise ConfigError("steps_per_epoch must be >= 0 (0 = auto)")
        for name in ("batch_size", "epochs", "decay_steps", "validate_from", "full_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.workers is not None and self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        from training.distribute import JIT_SETTINGS, PRECISIONS, STRATEGIES

        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if self.mixed_precision not in (*PRECISIONS, "auto"):
            raise ConfigError(f"--mixed-precision must be one of {', '.join(PRECISIONS)} or auto, "
                              f"not {self.mixed_precision!r}")
        if self.augment_on not in ("auto", "host", "device"):
            raise ConfigError(f"--augment-on must be auto, host or device, not {self.augment_on!r}")
        if self.jit_compile not in JIT_SETTINGS:
            raise ConfigError(f"--jit-compile must be one of {', '.join(JIT_SETTINGS)}, not {self.jit_compile!r}")
        if self.weights not in ("none", "", "imagenet") and not Path(self.weights).is_file():
            raise ConfigError(f"--weights {self.weights}: no such file (give a local weights file, "
                              "imagenet where the internet is reachable, or none)")
        if self.learning_rate <= 0 or not 0 < self.decay_rate <= 1:
            raise ConfigError("learning_rate must be > 0 and decay_rate in (0, 1]")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


#: The measured from-scratch recipe (see docs/training.md for the runs): the default for every
#: data source when training from scratch.
SCRATCH_RECIPE: dict[str, Any] = {
    "split": "study",            # validation on unseen heads
    "input_size": 160,           # 128 (4 × 4 of a 512² slice) missed near-isodense bleeds
    # no progressive resizing (--early-size 128: 13 % faster, weaker on the held-out site-d)
    "mixed_precision": "auto",   # bf16 where native (AMX, AVX512-BF16, Ampere): 160² near 128²'s float32 cost
    "learning_rate": 1e-3,       # batch 32: 10.6 images/s on 2 cores, batch 16: 9.3
    "epochs": 7,
    "steps_per_epoch": 0,        # auto: >= 60, about three passes over the training images in all
    "positive_fraction": 0.3,    # bleeding slices are 13 %: show them 30 % of the time
    "decay_rate": 0.7,           # lr 1e-3 -> 1.2e-4 by the last epoch
    "decay_steps": 1,
    "bn_momentum": 0.9,          # running statistics that follow a fast-moving network...
    "bn_recalibrate": 10,        # ...and are recomputed exactly before every validation
    "ema": 0.99,                 # validate and export the weights' moving average (~100 steps)
    "validate_from": 6,          # early epochs are never the best; their validation time trains
    "target_recall": 0.95,
    "hu_augment": "all",         # scanners differ in HU: calibration, kernel, noise (issue 12)
    "site_studies": 60,          # phantoms only: figures on the held-out site-d as well
}
SYNTHETIC_RECIPE = SCRATCH_RECIPE   # the name earlier versions used
#: Named recipes: `reference` is the RSNA 2019 Keras baseline as it was (for parity, or for
#: fine-tuning from ImageNet weights, where its lower learning rate belongs).
RECIPES: dict[str, dict[str, Any]] = {"scratch": SCRATCH_RECIPE, "reference": {}}
#: Minimum steps per epoch of an automatic schedule, and passes over the data in all.
AUTO_MIN_STEPS, AUTO_PASSES = 60, 3


def early_epochs(config: "TrainConfig") -> int:
    """How many first epochs train at `early_size` (progressive resizing): every epoch but the
    last `full_epochs`, or none when `early_size` is unset or not below `input_size`."""
    if config.early_size is None or config.early_size >= config.input_size:
        return 0
    return max(0, config.epochs - config.full_epochs)


def steps_per_epoch(config: "TrainConfig", train_images: int, replicas: int = 1) -> int | None:
    """Resolve `steps_per_epoch`: None = one pass per epoch (reference); 0 = auto, at least
    AUTO_MIN_STEPS and about AUTO_PASSES passes over the training images over all epochs (a
    from-scratch network needs a few hundred steps however small the data; a large set gets
    three passes), at the global batch (per-replica batch × replicas)."""
    if config.steps_per_epoch != 0:
        return config.steps_per_epoch
    passes = math.ceil(AUTO_PASSES * train_images / (config.batch_size * replicas * config.epochs))
    return max(AUTO_MIN_STEPS, passes)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def parser() -> argparse.ArgumentParser:
    """The flags of DESIGN §3 plus the knobs the recipes need; unset flags stay unset so a
    config file can supply them."""
    from training.distribute import JIT_SETTINGS, PRECISIONS, XLA_MIN_STEPS

    p = argparse.ArgumentParser(
        prog="python -m training", argument_default=argparse.SUPPRESS,
        description="Train, evaluate, choose thresholds and export an ICH model artifact.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="DIR", help="RSNA-layout folder: stage_2_train.csv + stage_2_train/")
    source.add_argument("--synthetic-studies", type=int, metavar="N", help="generate N phantom studies and train on them")
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML file of settings; flags override it")
    p.add_argument("--recipe", choices=tuple(RECIPES),
                   help="scratch (default from scratch: the measured recipe) | reference (RSNA "
                        "2019 Keras baseline; default with --weights)")
    p.add_argument("--synthetic-dir", metavar="DIR", help="where phantoms are written (reused if complete)")
    p.add_argument("--synthetic-slices", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="slices per phantom study (default 24 36)")
    p.add_argument("--synthetic-site", metavar="SITE",
                   help="phantom generator ranges: randomised (default) | legacy | site-d "
                        "(training.synthetic.SITES)")
    p.add_argument("--site-studies", type=int, metavar="N",
                   help="also generate N phantom studies of the held-out site-d and report every "
                        "figure on them (default 60 with the scratch recipe, 0 = none)")
    p.add_argument("--heldout", action="append", metavar="DIR",
                   help="an RSNA-layout folder from another site: figures reported separately "
                        "(repeatable); the model chooses nothing on it")
    p.add_argument("--operating", metavar="DIR",
                   help="an RSNA-layout folder of labelled studies, none of them in --data, on "
                        "which the study rule and thresholds are chosen (default: the "
                        "calibration split, which also chose the epoch)")
    p.add_argument("--operating-studies", type=int, metavar="N",
                   help="phantoms only: generate N studies of the training site's natural mix "
                        "(no faint emphasis, their own seed) and choose the operating point on "
                        "them (0 = on the calibration split)")
    p.add_argument("--seed", type=int)
    p.add_argument("--engine", help="keras.applications name (default InceptionV3)")
    p.add_argument("--input-size", type=int)
    p.add_argument("--early-size", type=int, metavar="PX",
                   help="progressive resizing: train every epoch but the last --full-epochs at "
                        "PX² (cheaper steps while features are coarse); the model is validated "
                        "and served at --input-size. Ignored unless smaller than --input-size "
                        "(default off: 128 saved 13 %% of the scratch recipe's time and was "
                        "weaker on the held-out site)")
    p.add_argument("--full-epochs", type=int, metavar="N",
                   help="how many last epochs train at --input-size when --early-size is set "
                        "(default 3)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--decay-rate", type=float)
    p.add_argument("--decay-steps", type=int, help="epochs per learning-rate decay step")
    p.add_argument("--steps-per-epoch", type=int, help="0 = auto (scratch recipe): >= 60, about "
                   "three passes over the training images in all; default reference: one pass")
    p.add_argument("--weights", help="none | imagenet | path to a weights file")
    p.add_argument("--bn-momentum", type=float, help="BatchNorm momentum (Keras default 0.99)")
    p.add_argument("--ema", type=float, metavar="MOMENTUM",
                   help="validate and export a moving average of the weights, updated every "
                        "step with this momentum (0: off)")
    p.add_argument("--weight-decay", type=float, metavar="WD",
                   help="AdamW's decoupled weight decay per unit learning rate (0: Adam)")
    p.add_argument("--mixup", type=float, metavar="ALPHA",
                   help="blend each training image with another, weight ~ Beta(ALPHA, ALPHA) "
                        "(0: off)")
    p.add_argument("--fused-batch-norm", action=argparse.BooleanOptionalAction,
                   help="train with BatchNorm on TensorFlow's fused kernel: the same arithmetic "
                        "as Keras' composed ops, a 22 %% cheaper step in bf16 on 2 CPU cores "
                        "(default on; --no-fused-batch-norm: Keras' own layers)")
    p.add_argument("--bn-recalibrate", type=int, metavar="BATCHES",
                   help="recompute BatchNorm statistics on this many batches before validation")
    p.add_argument("--validate-from", type=int, metavar="EPOCH",
                   help="first epoch to validate and consider for the best checkpoint (default 1)")
    p.add_argument("--positive-fraction", type=float, metavar="F",
                   help="draw this share of training images from bleeding slices; predictions "
                        "are prior-corrected back to the data's prevalence (default: natural)")
    p.add_argument("--positive-sampling", choices=POSITIVE_SAMPLING,
                   help="how bleeding slices are drawn: slice (each alike, default) | study (each "
                        "bleeding study alike: a 3-slice bleed as often as a 20-slice one)")
    p.add_argument("--loss", choices=("bce", "weighted"))
    p.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="geometric batch augmentation: flip, rotation, shift, zoom (default on)")
    p.add_argument("--augment-scale", type=float, metavar="X",
                   help="widen (or narrow) the geometric ranges: 1 = ±6° rotation, ±6 %% shift, "
                        "±8 %% zoom")
    p.add_argument("--flip-average", action=argparse.BooleanOptionalAction,
                   help="test-time augmentation in the artifact: each slice is scored with its "
                        "left-right mirror and the two averaged (twice the inference work)")
    p.add_argument("--hu-augment", metavar="OPS",
                   help="augmentation in HU before windowing: all | none | comma list of "
                        "calibration,kernel,noise (default all with the scratch recipe)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the prepared cache of a DICOM --data folder goes (default "
                        "data/cache/<folder>-<hash>-<input size>); --data may also name a cache "
                        "made by python -m training.prepare")
    p.add_argument("--workers", type=int, help="decoding processes (default: every core)")
    p.add_argument("--strategy", help="auto (multi-worker from TF_CONFIG, else every GPU, else "
                   "one device) | mirrored | multi-worker | none")
    p.add_argument("--mixed-precision", choices=(*PRECISIONS, "auto"),
                   help="mixed precision (bf16: Ampere or newer GPUs, TPUs, CPUs with AMX or "
                        "AVX512-BF16; auto: bf16 where the hardware has it, else none; the "
                        "scratch recipe's default); the artifact is float32")
    p.add_argument("--augment-on", choices=("auto", "host", "device"),
                   help="where HU augmentation, windows and geometric augmentation run: host "
                        "(the tf.data pipeline, CPU) or device (inside the training step, on the "
                        "accelerator; the CPU only reads the cache); auto: device when a GPU is visible")
    p.add_argument("--jit-compile", choices=JIT_SETTINGS,
                   help="compile the training step with XLA (on/off); auto: on for float32 runs "
                        f"of {XLA_MIN_STEPS} steps or more on a CPU without AVX-512 (14-17 %% "
                        "faster per step there, 36 %% slower with AVX-512), Keras' own choice on a GPU")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its folder (<out>/runs/<version>): its "
                        "config.json, checkpoint and best epoch; flags given override the config")
    p.add_argument("--split", choices=("slice", "study"))
    p.add_argument("--target-recall", type=float, metavar="R",
                   help="per label, the highest STUDY threshold with calibration study recall >= R "
                        "(default 0.95)")
    p.add_argument("--recall-confidence", type=float, metavar="C",
                   help="how sure the any threshold must be that recall on NEW studies reaches "
                        "--target-recall (training-conditional conformal, e.g. 0.9; default 0: "
                        "on average; the card reports the confidence reached either way)")
    p.add_argument("--gap-placement", type=float, metavar="F",
                   help="where the any threshold sits in calibration's gap, in logits, in (0, 1]: 0 is "
                        "the highest normal study below the ranked bleed, 1 that bleed (default: "
                        "training.studies.GAP_PLACEMENT)")
    p.add_argument("--platt", action=argparse.BooleanOptionalAction,
                   help="fit per-label Platt scaling on the calibration split and bake it into the "
                        "output layer (default on)")
    p.add_argument("--slice-target-recall", type=float, metavar="R",
                   help="per label, the slice-level threshold with calibration slice recall >= R; "
                        "reported in model.json as slice_thresholds, not used for alerts")
    p.add_argument("--study-rule", metavar="RULE",
                   help="auto (measure every rule, keep the best on calibration) | max | "
                        "consecutive-K | topk-K (default auto)")
    p.add_argument("--context", action=argparse.BooleanOptionalAction,
                   help="also train the slice-context head (training.context) on the slice model's "
                        "features and report its study figures beside the slice model's under "
                        "metrics.context (context.keras in the artifact; workers do not serve it)")
    p.add_argument("--out", metavar="DIR", help="artifact root (default models)")
    p.add_argument("--version", help="artifact version (default ich-<engine>-<UTC time>)")
    p.add_argument("--promote", action="store_true", help="point <out>/current at the new version")
    p.add_argument("--allow-failed", action="store_true",
                   help="export (and promote) even if the model fails the quality check; the card "
                        "still says failed and workers refuse it unless ICH_ALLOW_FAILED_MODEL=1")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2))
    return p


def load(argv: list[str] | None = None) -> TrainConfig:
    """Resolve the configuration of one run: defaults, recipe, file, then flags."""
    args = vars(parser().parse_args(argv))
    if "resume" in args:
        return _resumed(args)
    config_file = args.pop("config", None)
    from_file = read_toml(config_file) if config_file else {}
    chosen = {**from_file, **args}
    if "synthetic_studies" in chosen and "data" in chosen:
        # A flag for one source replaces the file's other source.
        chosen.pop("data" if "synthetic_studies" in args else "synthetic_studies")
    name = chosen.get("recipe") or (
        "scratch" if chosen.get("weights") in (None, "", "none") else "reference")
    if name not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, not {name!r}")
    values = {**RECIPES[name], **chosen, "recipe": name}
    if "synthetic_slices" in values:
        values["synthetic_slices"] = tuple(values["synthetic_slices"])
    return TrainConfig(**values).validate()


def _resumed(args: dict[str, Any]) -> TrainConfig:
    """The configuration a run folder recorded, with the flags given now on top."""
    run = Path(args["resume"])
    try:
        saved = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume {run}: not a run folder with a config.json ({exc})") from None
    args.pop("config", None)
    values = {k: v for k, v in {**saved, **args}.items() if k in _FIELDS}
    if "synthetic_slices" in values:
        values["synthetic_slices"] = tuple(values["synthetic_slices"])
    return TrainConfig(**values).validate()


def read_toml(path: Path) -> dict[str, Any]:
    """A flat TOML table whose keys are TrainConfig fields (dashes or underscores)."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown settings in {path}: {', '.join(unknown)}")
    return values
