"""Fit the model: the reference `MyDeepModel` API on top of our pipeline, and one full run.

`MyDeepModel(...).fit_model(train_df, valid_df)` keeps the RSNA 2019 Keras baseline's API and
defaults. What changes underneath: slices are decoded by `ich.imaging` (unreadable ones skipped,
not blacked out), validation uses inference-mode predictions and the competition metric, the
best epoch's weights are kept, and BatchNorm can be given a momentum that suits short runs from
scratch (DESIGN §6: with 0.99 the running statistics never settle in a few hundred steps).

Training reads a prepared cache (`training.cache`): decoded once, streamed, never held in
memory, so peak memory does not grow with the data set. It runs under a tf.distribute strategy
(`training.distribute`: every GPU of a node, or several nodes), optionally in mixed precision,
and exports the same single-device float32 `model.keras` whatever trained it. Each run has a
folder (`<out>/runs/<version>/`: resolved config, `history.csv` appended per epoch, the best
epoch's weights, a checkpoint of weights + optimizer + epoch) from which `--resume` continues.

`run(config)` is what `python -m training` does: data → cache → split → fit → thresholds →
artifact.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ich.labels import LABELS, WEIGHT_VECTOR
from training import context, evaluate, studies
from training.cache import SliceCache, is_cache
from training.config import ConfigError, TrainConfig, early_epochs, steps_per_epoch
from training.data import (DataError, Decoder, DevicePreprocess, Slices, dataset, hu_augment,
                           positive_odds_ratio, read_trainset, slice_headers, split)
from training.distribute import (is_chief, make_strategy, precision, resolve_jit, resolve_precision,
                                 strategy_name)
from training.fused_bn import fuse_batch_norm
from training.studies import StudySet

log = logging.getLogger(__name__)


def lr_schedule(learning_rate: float, decay_rate: float, decay_steps: int):
    """Step decay of the reference: lr · decay_rate^floor(epoch / decay_steps)."""
    def schedule(epoch: int, lr: float | None = None) -> float:
        return float(learning_rate * decay_rate ** math.floor(epoch / decay_steps))
    return schedule


def weighted_bce(weights=WEIGHT_VECTOR):
    """Binary cross-entropy with the RSNA label weights (`any` counts twice)."""
    import keras

    w = keras.ops.convert_to_tensor(np.asarray(weights, np.float32))

    def weighted_binary_crossentropy(y_true, y_pred):
        y_pred = keras.ops.clip(y_pred, 1e-7, 1 - 1e-7)
        bce = -(y_true * keras.ops.log(y_pred) + (1 - y_true) * keras.ops.log(1 - y_pred))
        return keras.ops.sum(bce * w, axis=-1) / keras.ops.sum(w)

    return weighted_binary_crossentropy


def weights_digest(model) -> str:
    """sha256 of every weight of `model`, in order: what a checkpoint saved and a resume
    restored can be compared by (logged at both ends)."""
    h = hashlib.sha256()
    for v in model.weights:
        h.update(np.ascontiguousarray(v.value.numpy()).tobytes())
    return h.hexdigest()[:16]


def validation_callback(model_wrapper: "MyDeepModel", valid: Slices):
    """Per epoch: inference-mode predictions on the calibration slices, streamed from the cache
    → `val_loss` (the mean binary log loss) and `val_weighted_log_loss` (the RSNA metric) in the
    logs. The best epoch by the latter is kept on disk (`best.weights.npz` + `best.json` +
    its predictions, in the run folder, so a resumed run knows it) and restored when training
    ends."""
    import keras

    class Validation(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best, self.best_epoch = math.inf, None
            self.y = self.p = self.rows = None
            self.dir = model_wrapper.run_dir

        def on_train_begin(self, logs=None):
            state = self.dir / "best.json" if self.dir else None
            if state is not None and state.is_file():     # a resumed run: what it had found
                best = json.loads(state.read_text())
                self.best, self.best_epoch = best["score"], best["epoch"]
                saved = np.load(self.dir / "best.predictions.npz")
                self.y, self.p, self.rows = saved["y"], saved["p"], saved["rows"]
                log.info("resumed: best epoch so far %d (calibration weighted log loss %.4f)",
                         self.best_epoch, self.best)

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            if epoch + 1 < model_wrapper.validate_from:   # early epochs are never the best:
                for key in ("val_loss", "val_weighted_log_loss", "val_any_auc"):
                    logs[key] = math.nan                                    # spend it training
                return
            with model_wrapper.averaged_weights():
                if model_wrapper.bn_recalibrate:
                    model_wrapper.recalibrate_batchnorm()
                with model_wrapper.prior_corrected():
                    rows, p = model_wrapper.predict_rows(valid)
                y = valid.labels[rows]
                logs["val_loss"] = float(evaluate.label_log_loss(y, p).mean())
                logs["val_weighted_log_loss"] = score = evaluate.weighted_log_loss(y, p)
                logs["val_any_auc"] = evaluate.auc(y[:, -1], p[:, -1]) or math.nan
                if score < self.best:
                    self.best, self.best_epoch = score, epoch + 1
                    self.y, self.p, self.rows = y, p, rows
                    self._save([v.value.numpy() for v in self.model.weights])

        def _save(self, weights) -> None:
            if self.dir is None:
                self._weights = weights
                return
            if not model_wrapper.chief:
                return
            np.savez(self.dir / "best.weights.tmp.npz", *weights)
            np.savez(self.dir / "best.predictions.tmp.npz", y=self.y, p=self.p, rows=self.rows)
            (self.dir / "best.weights.tmp.npz").replace(self.dir / "best.weights.npz")
            (self.dir / "best.predictions.tmp.npz").replace(self.dir / "best.predictions.npz")
            (self.dir / "best.json").write_text(json.dumps({"epoch": self.best_epoch, "score": self.best}) + "\n")

        def best_weights(self):
            if self.dir is None:
                return getattr(self, "_weights", None)
            path = self.dir / "best.weights.npz"
            if self.best_epoch is None or not path.is_file():
                return None
            with np.load(path) as saved:
                return [saved[f"arr_{i}"] for i in range(len(saved.files))]

        def on_train_end(self, logs=None):
            if self.params.get("epochs", model_wrapper.num_epochs) < model_wrapper.num_epochs:
                return     # an early phase of progressive resizing ended, not training
            weights = self.best_weights()
            if weights is not None:
                self.model.set_weights(weights)
            model_wrapper.correct_priors()     # the exported model predicts population priors

    return Validation()


def image_size_callback():
    """Each epoch's training image size in its logs (so in history.csv), and a log line where
    it changes (progressive resizing, `MyDeepModel.phases`); the fit loop sets `size`."""
    import keras

    class ImageSize(keras.callbacks.Callback):
        size, logged = None, None

        def on_epoch_begin(self, epoch, logs=None):
            if self.size != self.logged:
                log.info("epoch %d: training at %d² images", epoch + 1, self.size)
                self.logged = self.size

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["image_size"] = self.size

    return ImageSize()


def checkpoint_callback(model_wrapper: "MyDeepModel"):
    """Keras' BackupAndRestore (weights + optimizer state + epoch, at every epoch end, the last
    two kept so a kill while writing cannot lose both), logging the weights' digest when it
    saves and when a resumed run restores them."""
    import keras

    class Checkpoint(keras.callbacks.BackupAndRestore):
        began = False

        def on_train_begin(self, logs=None):
            if self.began:   # a later phase (`MyDeepModel.phases`): go on, nothing to restore
                self.model._initial_epoch = self._current_epoch
                return
            self.began = True
            super().on_train_begin(logs)
            start = self._current_epoch = self.model._initial_epoch or 0
            if start:
                log.info("resuming at epoch %d from %s (weights %s)", start + 1, self.backup_dir,
                         weights_digest(self.model))

        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            log.info("checkpoint: epoch %d saved to %s (weights %s)", epoch + 1, self.backup_dir,
                     weights_digest(self.model))

    folder = model_wrapper.run_dir / ("checkpoint" if model_wrapper.chief else
                                      f"checkpoint-worker-{model_wrapper.task_id}")
    return Checkpoint(str(folder), double_checkpoint=True, delete_checkpoint=False)


def progress_callback(epochs: int, steps: int, batch: int, every: int | None = None):
    """One line per `every` steps and per epoch, with images/s and the time left: what a log
    file wants (Keras' bar writes thousands of ANSI lines per epoch into a non-TTY)."""
    import keras

    every = every or max(1, steps // 10)

    class Progress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self.started = epoch, time.perf_counter()

        def on_train_batch_end(self, step, logs=None):
            step += 1
            if step % every == 0 and step < steps:
                elapsed = time.perf_counter() - self.started
                print(f"epoch {self.epoch + 1}/{epochs} step {step}/{steps}: loss "
                      f"{(logs or {}).get('loss', math.nan):.4f}, {step * batch / elapsed:.1f} img/s, "
                      f"epoch done in {_duration((steps - step) * elapsed / step)}", flush=True)

        def on_epoch_end(self, epoch, logs=None):
            logs, elapsed = logs or {}, time.perf_counter() - self.started
            val = "".join(f", {k} {logs[k]:.4f}" for k in ("val_weighted_log_loss", "val_any_auc")
                          if k in logs and not math.isnan(logs[k]))
            print(f"epoch {epoch + 1}/{epochs} done in {_duration(elapsed)}: loss "
                  f"{logs.get('loss', math.nan):.4f}{val}, {steps * batch / elapsed:.1f} img/s, "
                  f"{_duration((epochs - epoch - 1) * elapsed)} left", flush=True)

    return Progress()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class MyDeepModel:
    """The reference API. `engine` is a keras.applications constructor or its name; `weights`
    is "imagenet" (Keras downloads them where the internet is reachable), a local weights file,
    or None/"none": from scratch, the default, because nothing can be downloaded offline. The
    reference's call asks for the ImageNet weights explicitly and still works where it can.

    `batch_size` is per replica of `strategy` (default: one device); the global batch and the
    learning rate scale with the replicas (training.distribute). `run_dir`: where the best
    epoch, the checkpoint and history.csv go (None: memory only, no resume).
    `fused_batch_norm`: train on `training.fused_bn`'s layers (the same maths, a cheaper step);
    the exported model has Keras' own."""

    def __init__(self, engine="InceptionV3", input_dims=(224, 224, 3), batch_size=32,
                 learning_rate=3e-4, num_epochs=3, decay_rate=0.8, decay_steps=3,
                 weights=None, verbose=1, *, bn_momentum=None, loss="bce",
                 steps_per_epoch=None, augment=True, bn_recalibrate=0, validate_from=1,
                 positive_fraction=None, workers=2, seed=42, hu_augment=None, strategy=None,
                 run_dir=None, augment_on="host", ema=0.0, weight_decay=0.0, mixup=0.0,
                 flip_average=False, jit_compile="auto", early_size=None, early_epochs=0,
                 fused_batch_norm=True):
        import tensorflow as tf

        from ich.model import build_model

        self.engine = engine if isinstance(engine, str) else engine.__name__
        self.input_dims = tuple(input_dims)
        self.strategy = strategy or tf.distribute.get_strategy()
        self.replicas = self.strategy.num_replicas_in_sync
        self.batch_size, self.global_batch = batch_size, batch_size * self.replicas
        self.learning_rate = learning_rate * self.replicas      # linear scaling rule
        self.num_epochs, self.decay_rate, self.decay_steps = num_epochs, decay_rate, decay_steps
        self.weights = None if weights in (None, "none", "") else weights
        self.bn_momentum = bn_momentum
        self.ema = ema                     # momentum of the weights' moving average (0: none)
        self.weight_decay = weight_decay   # AdamW's decoupled decay (0: Adam)
        self.mixup = mixup                 # Beta(α, α) of training.data.mixup (0: off)
        self.flip_average = flip_average   # the exported graph averages slice and mirror
        self.verbose, self.loss, self.steps_per_epoch = verbose, loss, steps_per_epoch
        self.augment, self.bn_recalibrate = augment, bn_recalibrate
        self.validate_from = min(validate_from, num_epochs)
        # progressive resizing: the first `early_epochs` train at early_size², the rest (and
        # validation, and the artifact) at input_dims
        early = min(early_epochs, num_epochs - 1) if early_size and early_size < self.input_dims[0] else 0
        self.early_size, self.early_epochs = (early_size, early) if early > 0 else (None, 0)
        self.positive_fraction = positive_fraction
        self.logit_shift = 0.0     # log odds ratio of the training sampler (0: natural sampling)
        self.workers, self.seed = workers, seed
        self.hu_augment = hu_augment       # a training.data.HUAugment, or None
        self.jit_compile = jit_compile     # on | off | auto (Keras decides); training.distribute.resolve_jit
        self.augment_on = augment_on       # "host" (tf.data) or "device" (the training step)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.chief = is_chief(self.strategy)
        resolver = getattr(self.strategy, "cluster_resolver", None)
        self.task_id = getattr(resolver, "task_id", 0) or 0
        with self.strategy.scope():
            self.model = build_model(self.engine, None if self.early_size else self.input_dims[0],
                                     self.weights, bn_momentum)
            if fused_batch_norm:   # the same layers on the fused kernel: a cheaper step
                self.model = fuse_batch_norm(self.model)
            self._compile()
        self.cache: SliceCache | None = None
        self.validation = None
        self._forward = None
        self._precise_bn = None

    def _compile(self) -> None:
        import keras

        loss = weighted_bce() if self.loss == "weighted" else keras.losses.BinaryCrossentropy()
        averaging = {"use_ema": True, "ema_momentum": self.ema} if self.ema else {}
        if self.weight_decay:   # decoupled (Loshchilov & Hutter): not scaled by Adam's moments
            optimizer = keras.optimizers.AdamW(self.learning_rate, weight_decay=self.weight_decay,
                                               **averaging)
            # weights only: the output bias holds the label priors (init_output_bias), and
            # BatchNorm's scale and offset are no capacity to penalise
            optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        else:
            optimizer = keras.optimizers.Adam(self.learning_rate, **averaging)
        jit = {"on": True, "off": False}.get(self.jit_compile, "auto")
        self.model.compile(optimizer=optimizer, loss=loss, jit_compile=jit)

    def fit_model(self, train_df: Slices, valid_df: Slices, cache: SliceCache,
                  groups: np.ndarray | None = None):
        """Train on rows of a prepared `cache` with step decay and per-epoch validation;
        returns the Keras History, whose model holds the best epoch's weights. `groups`: the
        study of each training slice, to draw bleeding slices study-balanced (with
        `positive_fraction`; `--positive-sampling study`)."""
        import keras
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")   # the cache reads need no BLAS; TF has its own
        self.cache = cache
        self.logit_shift = math.log(positive_odds_ratio(train_df, self.positive_fraction))
        self.init_output_bias(train_df.prevalence(), self.logit_shift)
        self._train_df, self._train_groups = train_df, groups
        steps = self.steps_per_epoch or max(1, math.ceil(len(train_df) / self.global_batch))
        self.validation = validation_callback(self, valid_df)
        sizes = image_size_callback()
        callbacks = [
            sizes,     # first: history.csv records each epoch's image size
            keras.callbacks.LearningRateScheduler(
                lr_schedule(self.learning_rate, self.decay_rate, self.decay_steps)),
            self.validation,
        ]
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.chief:   # history first: a checkpoint never exists without its epoch's row
                callbacks.append(keras.callbacks.CSVLogger(str(self.run_dir / "history.csv"), append=True))
            callbacks.append(checkpoint_callback(self))
        line_progress = self.verbose == 2 or (self.verbose == 1 and not sys.stdout.isatty())
        if line_progress:
            callbacks.append(progress_callback(self.num_epochs, steps, self.global_batch))
        history = None
        for start, end, size in self.phases():
            sizes.size = size
            with self._fit_scope(size):
                phase = self.model.fit(self._train_batches(train_df, size, start), initial_epoch=start,
                                       epochs=end, steps_per_epoch=steps, callbacks=callbacks,
                                       verbose=0 if line_progress else self.verbose, shuffle=False)
            if history is None:
                history = phase
            else:    # one History over every phase, as a single fit returns
                history.epoch += phase.epoch
                for key, values in phase.history.items():
                    history.history.setdefault(key, []).extend(values)
        return history

    def phases(self) -> list[tuple[int, int, int]]:
        """(first epoch, end epoch, image size) of each `fit`: with progressive resizing the
        early epochs at `early_size`, then the rest at the input size. The same callbacks
        carry over; the training step is traced once per size (InceptionV3's weights do not
        depend on the image size, only its cost does: about (size ratio)²)."""
        full = self.input_dims[0]
        if not self.early_epochs:
            return [(0, self.num_epochs, full)]
        return [(0, self.early_epochs, self.early_size), (self.early_epochs, self.num_epochs, full)]

    @contextlib.contextmanager
    def _fit_scope(self, size: int | None = None):
        """Keras 3's `fit` under MultiWorkerMirroredStrategy fails twice before its first step
        (tensorflow/tensorflow#72388): it builds the model symbolically from one batch got by
        `strategy.reduce` of the (images, labels) tuple, which that strategy cannot reduce
        ("Attempt to convert a value (PerReplica...) to a Tensor"), and it reduces each
        scalar log of a step with `axis=0` ("Invalid reduction dimension 0 for input with 0
        dimensions"). Our model is built already, so under that strategy fit runs inside its
        scope with the model's own strategy unset (Keras then skips the symbolic build, its
        fallback: build at trace time, and reads the strategy from the scope), and each log
        leaves the step as a one-element vector, whose mean over axis 0 is the mean over the
        workers: the same scalar the other strategies log.

        With `--augment-on device` (any strategy) the step first turns the HU batch into
        augmented windows (`DevicePreprocess`); the symbolic build is skipped the same way, and
        the optimizer is built before tracing so its slots are not created inside the step."""
        import tensorflow as tf

        multi = isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)
        device = self.augment_on == "device"
        if not (multi or device):
            yield
            return
        step = self.model.train_step
        if device:
            # `--augment-on device`: batches arrive as float16 HU; augmentation and windows run
            # here, in the compiled step. Keras' symbolic build would feed that HU batch to
            # the model as it is, so the build is skipped as under multi-worker (below).
            with self.strategy.scope():
                prepare = DevicePreprocess(self.seed + self.task_id, self.hu_augment,
                                           self.augment, self.input_dims[0], self.mixup)
                if not self.model.optimizer.built:   # that build made its slots before tracing
                    self.model.optimizer.build(self.model.trainable_variables)
            iterations, inner = self.model.optimizer.iterations, step
            shrink = size if size and size != self.input_dims[0] else None
            step = lambda data: inner(prepare(data[0], iterations, data[1], shrink))   # noqa: E731
        if multi:
            logged = step
            step = lambda data: {k: tf.reshape(v, [1]) for k, v in logged(data).items()}  # noqa: E731
        saved = self.model._distribute_strategy
        self.model._distribute_strategy = None
        self.model.train_step = step
        try:
            with self.strategy.scope():
                yield
        finally:
            self.model._distribute_strategy = saved
            del self.model.train_step          # the class's own again

    def _train_batches(self, train_df: Slices, size: int | None = None, first_epoch: int = 0):
        """The training pipeline: one per device group; with several replicas, one per input
        pipeline (worker), each reading its own share of the rows at the per-replica batch.
        `size`: the images' size (progressive resizing; None: the cache's). A phase starting
        at `first_epoch` > 0 draws its own order and augmentation, not the first phase's again."""
        kwargs = {"training": True, "seed": self.seed + first_epoch, "augment": self.augment, "size": size,
                  "hu_augment": self.hu_augment, "positive_fraction": self.positive_fraction,
                  "raw": self.augment_on == "device", "mixup": self.mixup,
                  "groups": self._train_groups}
        if self.replicas == 1:
            return self.cache.batches(train_df, self.global_batch, **kwargs)
        return self.strategy.distribute_datasets_from_function(
            lambda ctx: self.cache.batches(
                train_df, ctx.get_per_replica_batch_size(self.global_batch),
                shard=(ctx.num_input_pipelines, ctx.input_pipeline_id), **kwargs))

    def export_model(self):
        """The trained network as a single-device float32 model (the artifact), whatever
        strategy and precision trained it; with `flip_average`, the same weights in the graph
        that averages each slice with its mirror (`ich.model.build_model`)."""
        from ich.model import build_model

        with precision("none"):
            model = build_model(self.engine, self.input_dims[0], None, self.bn_momentum,
                                flip_average=self.flip_average)
        model.set_weights([v.value.numpy() for v in self.model.weights])
        return model

    def init_output_bias(self, prevalence, shift: float = 0.0) -> None:
        """Start each sigmoid at its label's prevalence as the sampler shows it (bias =
        logit(prevalence) + shift), so early steps learn features instead of the class priors
        (Karpathy's "init well")."""
        p = np.clip(np.asarray(prevalence, np.float64), 1e-3, 1 - 1e-3)
        self.model.get_layer("ich").bias.assign((np.log(p / (1 - p)) + shift).astype(np.float32))

    @contextlib.contextmanager
    def prior_corrected(self):
        """The output biases minus the sampler's log odds ratio, for inference on data with the
        population's priors (King & Zeng's prior correction). Exact for `any`, on which the
        sampler draws; for a subtype exact wherever the slice has no other bleed, the common
        case. With `--positive-sampling study` a bleeding slice's weight also depends on its
        study's size, so the correction holds on average; Platt scaling on calibration absorbs
        the rest. Restored on exit, so training continues from its own biases."""
        shift = self.logit_shift
        self._add_to_output_bias(-shift)
        try:
            yield
        finally:
            self._add_to_output_bias(shift)

    def correct_priors(self) -> None:
        """Make `prior_corrected` permanent (end of training)."""
        self._add_to_output_bias(-self.logit_shift)
        self.logit_shift = 0.0

    def _add_to_output_bias(self, delta: float) -> None:
        bias = self.model.get_layer("ich").bias
        bias.assign(bias.value + np.float32(delta))

    def apply_platt(self, platt: dict[str, tuple[float, float]]) -> None:
        """Bake per-label Platt scaling (logit → a·logit + b) into the output layer."""
        layer = self.model.get_layer("ich")
        kernel, bias = layer.kernel.value.numpy(), layer.bias.value.numpy()
        for label, (a, b) in platt.items():
            i = LABELS.index(label)
            kernel[:, i] *= a
            bias[i] = a * bias[i] + b
        layer.kernel.assign(kernel)
        layer.bias.assign(bias)

    def predict(self, slices: Slices, decoder: Decoder | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Inference-mode probabilities → (labels, probabilities) of the decodable slices."""
        rows, p = self.predict_rows(slices, decoder)
        return slices.labels[rows], p

    def predict_rows(self, slices: Slices, decoder: Decoder | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Inference-mode probabilities → (row indices, probabilities) of the decodable slices:
        from the cache for its rows, else decoded from DICOM."""
        if self._forward is None:
            self._forward = evaluate.compiled_forward(self.model)
        if slices.rows is not None and self.cache is not None:
            batches = self.cache.batches(slices, self.global_batch, training=False)
        else:
            batches = dataset(slices, decoder or Decoder(slices.paths, self.input_dims[0]),
                              self.global_batch, training=False, workers=self.workers or 2)
        rows, p = evaluate.predict_batches(self._forward, batches)
        if not len(rows):
            raise ValueError("no decodable slices to predict")
        return rows, p

    @contextlib.contextmanager
    def averaged_weights(self):
        """With `ema`, the moving average of the weights (Keras' `use_ema`, updated every step)
        stands in for the weights while validating, so the epoch kept as the best, and exported,
        is the averaged network; training then resumes from its own weights. Averaged weights
        need BatchNorm statistics of their own: `bn_recalibrate` recomputes them inside.
        Keras itself swaps the average in only once, when `fit` ends."""
        optimizer = self.model.optimizer
        if not (self.ema and optimizer.built):
            yield
            return
        variables = self.model.trainable_variables
        own = [v.value.numpy() for v in variables]
        # keras.callbacks.SwapEMAWeights swaps with the same attribute (Keras 3)
        for variable, average in zip(variables, optimizer._model_variables_moving_average):
            variable.assign(average)
        try:
            yield
        finally:
            for variable, value in zip(variables, own):
                variable.assign(value)

    def recalibrate_batchnorm(self) -> None:
        """Precise BatchNorm before validation: see `PreciseBatchNorm`."""
        if self._precise_bn is None:
            rows = np.random.default_rng(self.seed).permutation(len(self._train_df))
            subset = self._train_df.take(rows[: self.bn_recalibrate * self.batch_size])
            batches = self.cache.batches(subset, self.batch_size, training=False)
            self._precise_bn = PreciseBatchNorm(self.model, batches.map(lambda images, rows: images))
        self._precise_bn()


class PreciseBatchNorm:
    """Replace every BatchNorm's running mean and variance by their plain average over a fixed
    set of unaugmented training batches under the current weights ("precise BN", Wu & Johnson
    2021). An exponential average with few steps lags the weights it should describe, and the
    inference-mode predictions of a network trained from scratch then swing from one epoch to
    the next (DESIGN §6).

    One compiled training-mode forward pass is traced with momentum 0, so each call leaves that
    batch's statistics in the moving variables; they are summed here and their mean assigned.
    """

    def __init__(self, model, batches) -> None:
        import tensorflow as tf

        self.model, self.batches = model, batches
        self.layers = batchnorm_layers(model)
        saved = [layer.momentum for layer in self.layers]
        try:
            for layer in self.layers:
                layer.momentum = 0.0
            forward = tf.function(lambda images: model(images, training=True))
            self.forward = forward.get_concrete_function(batches.element_spec)
        finally:   # the training step was traced earlier and keeps its own momentum
            for layer, momentum in zip(self.layers, saved):
                layer.momentum = momentum

    def __call__(self) -> None:
        variables = [v for layer in self.layers for v in (layer.moving_mean, layer.moving_variance)]
        sums, count = [np.zeros(v.shape, np.float64) for v in variables], 0
        for images in self.batches:
            self.forward(images)
            for total, v in zip(sums, variables):
                total += v.value.numpy()
            count += 1
        for total, v in zip(sums, variables):
            v.assign((total / max(count, 1)).astype(np.float32))


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def batchnorm_layers(model) -> list:
    """Every BatchNorm layer of `model`, nested engines included, in graph order (the stem first)."""
    import keras

    return [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]


# ----------------------------------------------------------------------------- calibration

#: Labels with fewer calibration positives (or negatives) than this keep their probabilities.
PLATT_MIN_CLASS = 5


def fit_platt(y: np.ndarray, p: np.ndarray) -> dict[str, tuple[float, float]]:
    """Per-label Platt scaling fitted on calibration slices: logit' = a·logit + b.

    A network trained from scratch on a few thousand slices ranks well and is overconfident
    (measured: 80 studies, `any` AUC 0.99, weighted log loss 0.62 × the prevalence-only loss).
    Refitting one slope and one offset per label on held-out predictions fixes the probabilities
    without touching the ranking (AUC, and which studies alert, are unchanged); the result is
    baked into the output layer, so workers need nothing new. Labels with too few calibration
    positives, or a fitted slope <= 0, are left alone."""
    from sklearn.linear_model import LogisticRegression

    logits = evaluate.logit(p)
    out = {}
    for i, label in enumerate(LABELS):
        positives = int(np.sum(y[:, i] > 0.5))
        if min(positives, len(y) - positives) < PLATT_MIN_CLASS:
            continue
        fit = LogisticRegression(C=1.0).fit(logits[:, i:i + 1], (y[:, i] > 0.5).astype(int))
        a, b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
        if a > 0:
            out[label] = (a, b)
    return out


def apply_platt(p: np.ndarray, platt: dict[str, tuple[float, float]]) -> np.ndarray:
    """The same scaling on probabilities already computed."""
    logits = evaluate.logit(p)
    for label, (a, b) in platt.items():
        i = LABELS.index(label)
        logits[:, i] = a * logits[:, i] + b
    return evaluate.sigmoid(logits).astype(np.float32)


# ----------------------------------------------------------------------------- one run


def augment_on(setting: str) -> str:
    """`auto`: the accelerator when TensorFlow sees a GPU (the CPU cannot augment fast enough
    to feed one, docs/training.md), else the tf.data pipeline, which overlaps the augmentation
    of the next batch with the current step on a CPU."""
    if setting != "auto":
        return setting
    import tensorflow as tf

    return "device" if tf.config.list_physical_devices("GPU") else "host"


def device_step_jit(config: TrainConfig, placement: str) -> str:
    """`config.jit_compile`, or `off` where the training step holds augmentation XLA cannot
    compile (`--augment-on device`: `DevicePreprocess.xla_compiles`); an explicit `on` is then
    refused before any data is prepared, rather than failing at the first step's trace."""
    if placement != "device" or config.jit_compile == "off" or DevicePreprocess(
            config.seed, hu_augment(config.hu_augment), config.augment and config.augment_scale,
            config.input_size, config.mixup).xla_compiles():
        return config.jit_compile
    if config.jit_compile == "on":
        raise ConfigError("--jit-compile on: XLA cannot compile this run's augmentation in the "
                          "training step (--augment-on device: geometric augmentation and mixup "
                          "have no XLA kernels here); use --augment-on host or --jit-compile off")
    log.info("XLA off: this run's augmentation in the training step has no XLA kernels")
    return "off"


def default_version(engine: str) -> str:
    return f"ich-{engine.lower()}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def prepare_data(config: TrainConfig) -> tuple[SliceCache, dict]:
    """The prepared cache to train on: `--data` itself when it is one, else prepared (or
    finished) from the RSNA-layout folder, generating phantoms first when asked."""
    from training.prepare import prepare

    if config.data is not None and is_cache(config.data):
        cache = SliceCache.open(config.data, config.input_size)
        return cache, {"source": "prepared-cache", "path": str(config.data),
                       "dicom": cache.meta["source"]}
    if config.data is not None:
        folder, card = Path(config.data), {"source": "rsna-layout", "path": str(config.data)}
    else:
        lo, hi = config.synthetic_slices
        from training.synthetic import (SITES, folder_name, generate_once, manifest, read_manifest,
                                        site_digest, site_named)

        folder = Path(config.synthetic_dir or Path("data/synthetic") / folder_name(
            config.seed, config.synthetic_studies, (lo, hi), config.synthetic_site))
        generate_once(folder, config.synthetic_studies, config.seed, (lo, hi), config.synthetic_site,
                      config.workers)
        # A reused folder: what it holds, not what was asked (asked: a folder from before manifests).
        held = read_manifest(folder) or manifest(config.synthetic_studies, config.seed, (lo, hi),
                                                 config.synthetic_site)
        known = held.get("site") in SITES and held.get("site_digest") == site_digest(held["site"])
        card = {"source": "synthetic", "path": str(folder),
                **{k: held.get(k) for k in ("studies", "seed", "slices", "site", "site_digest")},
                "faint_bleeds": site_named(held["site"]).faint_bleeds if known else None}
    cache = prepare(folder, cache_dir(config, folder), config.input_size, config.workers)
    return cache, {**card, "cache": str(cache.root)}


def cache_dir(config: TrainConfig, folder: Path) -> Path:
    """`--cache-dir`, else `cache/<folder>-<digest of its path>-<input size>` beside the
    phantoms (their parent folder) or under data/ for a `--data` folder."""
    if config.cache_dir:
        return Path(config.cache_dir)
    tag = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:8]
    root = Path(folder).parent if config.data is None else Path("data")
    return root / "cache" / f"{Path(folder).name}-{tag}-{config.input_size}"


#: The held-out site's and the operating studies' phantoms use their own seeds: same-seed
#: studies share UIDs and anatomy.
HELDOUT_SITE, HELDOUT_SEED_OFFSET = "site-d", 7919
OPERATING_SEED_OFFSET = 50021


def _phantoms(config: TrainConfig, site, seed: int, studies: int) -> Path:
    """`studies` phantoms of `site` beside training's (generated once, then reused)."""
    from training.synthetic import folder_name, generate_once

    root = Path(config.synthetic_dir).parent if config.synthetic_dir else Path("data/synthetic")
    slices = tuple(config.synthetic_slices)
    folder = root / folder_name(seed, studies, slices, site)
    return generate_once(folder, studies, seed, slices, site, config.workers)


def heldout_sets(config: TrainConfig) -> dict[str, Path]:
    """Name → RSNA-layout folder of every held-out site: `--heldout` folders and, for phantoms,
    `site_studies` studies of site-d (ranges the training data never had)."""
    sets = {Path(d).name: Path(d) for d in config.heldout}
    if config.synthetic_studies is not None and config.site_studies:
        sets[HELDOUT_SITE] = _phantoms(config, HELDOUT_SITE, config.seed + HELDOUT_SEED_OFFSET,
                                       config.site_studies)
    return sets


def operating_set(config: TrainConfig) -> tuple[Path | None, set[str]]:
    """The folder the study rule and thresholds are chosen on, and its StudyInstanceUIDs:
    `--operating DIR`, or for phantoms `operating_studies` studies of the training site's
    natural mix with their own seed; (None, {}): the calibration split, which also chose the
    epoch and the Platt scaling, chooses. Fails before training when it cannot choose (too few
    of either kind); `run` refuses studies shared with the training data."""
    if config.operating:
        folder = Path(config.operating)
    elif config.synthetic_studies is not None and config.operating_studies:
        from training.synthetic import natural_mix

        folder = _phantoms(config, natural_mix(config.synthetic_site),
                           config.seed + OPERATING_SEED_OFFSET, config.operating_studies)
    else:
        return None, set()
    from training.calibrate import MIN_STUDIES

    found = read_trainset(folder)
    found_studies = StudySet.build(found.labels, found.labels, slice_headers(found.paths))
    truth = found_studies.truth()[:, -1]
    bleeding, normal = int(truth.sum()), int(len(truth) - truth.sum())
    if min(bleeding, normal) < MIN_STUDIES:
        raise DataError(f"operating studies {folder}: {bleeding} bleeding and {normal} normal; at "
                        f"least {MIN_STUDIES} of each are needed to choose an operating point")
    return folder, {s.uid for s in found_studies}


def score_operating(forward, config: TrainConfig, folder: Path, choose) -> tuple:
    """(the rule `choose` picks on `folder`'s studies, the card's record of them), scored from
    DICOM as a worker decodes them."""
    _, _, y, p, headers, decoder = evaluate.predict_folder(
        forward, config.input_size, folder, config.batch_size, config.workers or 2)
    operating = StudySet.build(y, p, headers)
    rule, rows = choose(operating)
    study = studies.study_metrics(operating, rule)
    log.info("operating studies %s: %d (%d bleeding): %s, recall %s, specificity %s", folder.name,
             study["studies"], study["positive_studies"], rule, study["recall"], study["specificity"])
    return rule, {"data": str(folder), "images": int(len(y)), "study": study, "rules": rows,
                  "decode": decoder.report()}


def score_heldout(model, config: TrainConfig, sets: dict[str, Path], slice_thresholds, rule) -> dict:
    """The exported model's figures on every held-out site, straight from DICOM as a worker
    would decode it, each on its own (it chose nothing)."""
    from training.synthetic import read_acquisitions

    results = {}
    forward = evaluate.compiled_forward(model)
    for name, folder in sets.items():
        _, _, y, p, headers, decoder = evaluate.predict_folder(
            forward, config.input_size, folder, config.batch_size, config.workers or 2)
        figures = evaluate.figures(y, p, headers, slice_thresholds, rule,
                                   attributes=read_acquisitions(folder))
        results[name] = {"data": str(folder), **figures, "decode": decoder.report()}
        study = figures["study"]
        log.info("held-out %s: %d studies, study AUC %s, recall %s, specificity %s", name,
                 study["studies"], study["auc"], study["recall"], study["specificity"])
    return results


def run(config: TrainConfig) -> Path | None:
    """data → cache → split → fit → study rule and thresholds → figures on test studies →
    artifact (→ promote). Returns its folder; None on a non-chief worker, which writes none."""
    import keras

    from ich.model import ModelCard, promote, save_artifact

    started = time.perf_counter()
    strategy = make_strategy(config.strategy)         # before any other TensorFlow work
    version = config.version = config.version or default_version(config.engine)
    config.mixed_precision = resolve_precision(config.mixed_precision)   # recorded resolved
    placement = augment_on(config.augment_on)
    config.jit_compile = device_step_jit(config, placement)
    run_dir = Path(config.resume) if config.resume else Path(config.out) / "runs" / version
    if (Path(config.out) / version).exists():
        raise FileExistsError(f"{Path(config.out) / version} exists: choose another --version")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_chief(strategy):
        (run_dir / "config.json").write_text(config.to_json())
    keras.utils.set_random_seed(config.seed)
    for folder in config.heldout:                       # a bad folder fails now, not after hours
        read_trainset(folder)
    operating, operating_uids = operating_set(config)
    cache, data_card = prepare_data(config)
    trainset, headers = cache.slices, cache.headers
    shared = operating_uids & set(map(str, headers.studies))
    if shared:   # a study the model trained on would place the threshold too kindly
        raise DataError(f"{len(shared)} of the operating studies in {operating} are also in the "
                        f"training data; choose the operating point on other studies")
    train_idx, calib_idx, test_idx = split(trainset, config.split, headers.studies)
    train, calib, test = (trainset.take(i) for i in (train_idx, calib_idx, test_idx))
    log.info("split %s: %d training, %d calibration, %d test images", config.split, len(train),
             len(calib), len(test))

    replicas = strategy.num_replicas_in_sync
    steps = (steps_per_epoch(config, len(train), replicas)
             or math.ceil(len(train) / (config.batch_size * replicas)))
    config.jit_compile = resolve_jit(config.jit_compile, config.mixed_precision, steps * config.epochs)
    with precision(config.mixed_precision):
        deep = MyDeepModel(
            engine=config.engine, input_dims=(config.input_size, config.input_size, 3),
            batch_size=config.batch_size, learning_rate=config.learning_rate,
            num_epochs=config.epochs, decay_rate=config.decay_rate, decay_steps=config.decay_steps,
            weights=config.weights, verbose=config.verbose, bn_momentum=config.bn_momentum,
            ema=config.ema, weight_decay=config.weight_decay, mixup=config.mixup,
            flip_average=config.flip_average,
            loss=config.loss, steps_per_epoch=steps_per_epoch(config, len(train), replicas),
            augment=config.augment and config.augment_scale, bn_recalibrate=config.bn_recalibrate,
            validate_from=config.validate_from, positive_fraction=config.positive_fraction,
            workers=config.workers, seed=config.seed, hu_augment=hu_augment(config.hu_augment),
            strategy=strategy, run_dir=run_dir, augment_on=placement, jit_compile=config.jit_compile,
            early_size=config.early_size, early_epochs=early_epochs(config),
            fused_batch_norm=config.fused_batch_norm)
        log.info("%d epochs x %d steps of %d (%d replica(s)), precision %s, XLA %s, augmentation on %s",
                 config.epochs, steps, deep.global_batch, deep.replicas, config.mixed_precision,
                 config.jit_compile, deep.augment_on)
        if config.early_size and not deep.early_epochs:
            log.warning("--early-size %d unused: it must be below --input-size %d, and --epochs %d "
                        "more than --full-epochs %d", config.early_size, config.input_size,
                        config.epochs, config.full_epochs)
        deep.fit_model(train, calib, cache, headers.studies[train_idx]
                       if config.positive_sampling == "study" else None)
    # Calibration chose the epoch; it now calibrates the probabilities and chooses the operating
    # point. Test chooses nothing.
    v = deep.validation
    if config.flip_average:   # what calibrates is what will serve: slice and mirror averaged
        rows, v.p = evaluate.predict_batches(evaluate.compiled_forward(deep.export_model()),
                                             cache.batches(calib.take(v.rows), config.batch_size, training=False))
        if not np.array_equal(rows, np.arange(len(v.rows))):
            raise RuntimeError("calibration predictions out of order")
    platt = fit_platt(v.y, v.p) if config.platt else {}
    if platt:
        deep.apply_platt(platt)
        before = evaluate.weighted_log_loss(v.y, v.p)
        v.p = apply_platt(v.p, platt)
        log.info("Platt scaling on calibration: weighted log loss %.4f -> %.4f", before,
                 evaluate.weighted_log_loss(v.y, v.p))
    model = deep.export_model()       # every figure below is the artifact's own
    forward = evaluate.compiled_forward(model)
    calib_studies = StudySet.build(v.y, v.p, headers.take(calib_idx[v.rows]))
    test_rows, test_p = evaluate.predict_batches(
        forward, cache.batches(test, config.batch_size, training=False))
    test_y = test.labels[test_rows]
    test_studies = StudySet.build(test_y, test_p, headers.take(test_idx[test_rows]))

    slice_thresholds = evaluate.choose_thresholds(v.y, v.p, config.slice_target_recall)

    def choose(chosen_on: StudySet):
        return studies.choose_rule(chosen_on, config.target_recall, studies.candidates(config.study_rule),
                                   config.recall_confidence or None, config.gap_placement)

    rule, candidates = choose(calib_studies)
    calibration = {"weighted_log_loss": evaluate.weighted_log_loss(v.y, v.p), "images": int(len(v.y)),
                   "platt": {label: {"a": a, "b": b} for label, (a, b) in platt.items()},
                   "rules": candidates}
    if operating is not None:   # calibration's own choice stays on record beside the shipped one
        calibration["chosen_here"] = {**rule.describe(), "thresholds": dict(rule.thresholds)}
        rule, chosen = score_operating(forward, config, operating, choose)
    results = {**evaluate.metrics(test_y, test_p, slice_thresholds), "split": "test",
               "study": studies.study_metrics(test_studies, rule),
               "calibration": {**calibration, "study": studies.study_metrics(calib_studies, rule)},
               "best_epoch": v.best_epoch}
    if operating is not None:
        results["operating"] = chosen
    sets = heldout_sets(config)
    results["heldout"] = score_heldout(model, config, sets, slice_thresholds, rule)
    head = None
    if config.context:   # measured beside the slice model; workers do not serve it (yet)
        parts = {name: (part, headers.take(idx), cache.batches(part, config.batch_size, training=False))
                 for name, part, idx in (("train", train, train_idx), ("calibration", calib, calib_idx),
                                         ("test", test, test_idx))}
        for name, folder in sets.items():
            held = read_trainset(folder)
            parts[f"heldout:{name}"] = (held, slice_headers(held.paths), dataset(
                held, Decoder(held.paths, config.input_size), config.batch_size, training=False))
        head, results["context"] = context.measure(
            model, parts, config.target_recall, studies.candidates(config.study_rule), seed=config.seed,
            confidence=config.recall_confidence or None)
    results["seconds"] = round(time.perf_counter() - started, 1)
    quality = evaluate.verdict(results)   # did it learn? (on test: it chose nothing)
    card = ModelCard(
        version=version, engine=config.engine,
        input_size=config.input_size, thresholds=dict(rule.thresholds),
        study_rule=rule.describe(), slice_thresholds=slice_thresholds, metrics=results,
        data={**data_card, "split": config.split, "split_seed": 42,
              "train_images": len(train), "calibration_images": len(calib),
              "test_images": len(test), "calibration_images_scored": int(len(v.y)),
              "test_images_scored": int(len(test_y)),
              "studies": {"train": len(set(headers.studies[train_idx])),
                          "calibration": len(set(headers.studies[calib_idx])),
                          "test": len(set(headers.studies[test_idx]))},
              "read": cache.meta["read"], "skipped": cache.report(),
              "train_prevalence": dict(zip(LABELS, map(float, train.prevalence())))},
        training={"strategy": strategy_name(strategy), "replicas": deep.replicas,
                  "global_batch": deep.global_batch, "learning_rate": deep.learning_rate,
                  "mixed_precision": config.mixed_precision, "jit_compile": config.jit_compile,
                  "run_dir": str(run_dir)},
        notes=_notes(config, rule, operating),
        status="ok" if quality["passed"] else "failed", verdict=quality)
    if not is_chief(strategy):     # the chief writes and judges the artifact, maybe not yet
        return None
    out = save_artifact(model, card, Path(config.out))
    if head is not None:
        head.save(out / "context.keras")
    write_extras(out, config, run_dir, test_y, test_p, slice_thresholds)
    evaluate.write_predictions(out / "predictions.csv", {
        "calibration": (calib.take(v.rows), headers.take(calib_idx[v.rows]), v.p),
        "test": (test.take(test_rows), headers.take(test_idx[test_rows]), test_p)})
    studies.plot_study_curves(test_studies, rule, out / "study_curves.png")
    for bulky in ("checkpoint", "best.weights.npz"):   # the artifact has what they held
        path = run_dir / bulky
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if not quality["passed"]:
        log.error("model %s FAILED the quality check: %s", card.version, "; ".join(quality["reasons"]))
    if config.promote and (quality["passed"] or config.allow_failed):
        promote(out, Path(config.out) / "current")
        log.info("promoted %s to %s", out.name, Path(config.out) / "current")
    return out


def _notes(config: TrainConfig, rule, operating: Path | None = None) -> str:
    where = "calibration" if operating is None else "the operating studies"
    confidence = (f"held on new studies with confidence {config.recall_confidence}"
                  if config.recall_confidence else "on average on new studies")
    chosen = (f"study rule {rule} with per-label study thresholds for study recall "
              f">= {config.target_recall} ({confidence}; any: split-conformal on {where})"
              if config.target_recall
              else "study rule max with the default thresholds (any 0.15)")
    decided = ("The epoch, the rule and every threshold were chosen on calibration"
               if operating is None else
               f"The epoch and the Platt scaling were chosen on calibration, the rule and the study "
               f"thresholds on separate operating studies ({operating})")
    return (f"Trained from {'scratch' if config.weights in (None, 'none') else config.weights}; "
            f"{config.split} split into train / calibration / test; {chosen}. {decided}; metrics are inference-mode "
            "predictions on the test split, which chose nothing. A study is positive for a label "
            "when the rule's study score >= that label's threshold; slice_thresholds are the "
            "slice-level operating points, for reference only.")


def read_history(path: Path) -> dict[str, list[float]]:
    """history.csv (every epoch, across resumes) → {column: values}, one value per epoch: an
    epoch repeated by a resume (killed after its row, before its checkpoint) keeps its last row."""
    epochs: dict[int, dict[str, str]] = {}
    if path.is_file():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                epochs[int(row.pop("epoch"))] = row
    history: dict[str, list[float]] = {}
    for epoch in sorted(epochs):
        for key, value in epochs[epoch].items():
            history.setdefault(key, []).append(float(value) if value not in ("", None) else math.nan)
    return history


def write_extras(folder: Path, config: TrainConfig, run_dir: Path, y, p, thresholds) -> None:
    """config.json, history.csv and .json and the plots, beside model.keras."""
    (folder / "config.json").write_text(config.to_json())
    history = read_history(run_dir / "history.csv")
    if (run_dir / "history.csv").is_file():
        shutil.copy2(run_dir / "history.csv", folder / "history.csv")
    as_json = {k: [None if math.isnan(v) else v for v in values] for k, values in history.items()}
    (folder / "history.json").write_text(json.dumps(as_json, indent=2) + "\n")
    evaluate.plot_history(history, folder / "loss.png")
    evaluate.plot_precision_recall(y, p, thresholds, folder / "precision_recall.png")
