"""Every accelerator of a node, or of several: the tf.distribute strategy and mixed precision.

`--strategy auto` (the default) picks, in this order:
- `MultiWorkerMirroredStrategy` when `TF_CONFIG` names a cluster of more than one worker (one
  process per node, each with every GPU of its node; deploy/training/README.md shows a
  two-node launch);
- `MirroredStrategy` when more than one GPU is visible;
- otherwise the default strategy: one device, exactly the single-GPU or CPU run of before.
`--strategy mirrored` asks for MirroredStrategy on one node even without GPUs: over the
logical CPU devices (how the tests exercise it on two CPU devices).

The batch size of the configuration is per replica: the global batch is that times the replicas
in sync, and the learning rate is scaled by the same factor (the linear scaling rule of Goyal et
al. 2017), so a recipe measured on one device keeps its per-example step on eight.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "mirrored", "multi-worker", "none")
PRECISIONS = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
#: CPU flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic that oneDNN uses: AMX
#: (Sapphire Rapids and later) and AVX512-BF16 (Cooper Lake, Zen 4). Without them bf16 is
#: emulated and slower than float32.
CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
#: `--jit-compile` settings; `auto` compiles a float32 step on a CPU without AVX-512 with XLA
#: once a run has this many steps: XLA's compile costs about 12 s more than TensorFlow's graph and saves 14-17 % of
#: each InceptionV3 step at 128-160² (bench/bench_training_step.py), repaid within 50-200 steps.
JIT_SETTINGS, XLA_MIN_STEPS = ("auto", "on", "off"), 300


def cluster_workers() -> int:
    """Workers named by TF_CONFIG (0 without one)."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "") or "{}").get("cluster", {})
    except ValueError:
        raise ValueError("TF_CONFIG is not valid JSON") from None
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def make_strategy(name: str = "auto"):
    """The tf.distribute strategy for `name` (see the module docstring). Create it before any
    other TensorFlow work: a multi-worker strategy must come first in the process."""
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {name!r}")
    if name == "multi-worker" or (name == "auto" and cluster_workers() > 1):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif name == "auto" and len(tf.config.list_physical_devices("GPU")) > 1:
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    log.info("strategy %s: %d replica(s) in sync", strategy_name(strategy), strategy.num_replicas_in_sync)
    return strategy


def strategy_name(strategy) -> str:
    """The public name of a strategy (TensorFlow's class behind MultiWorkerMirroredStrategy
    is called CollectiveAllReduceStrategy)."""
    import tensorflow as tf

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    return type(strategy).__name__


def is_chief(strategy) -> bool:
    """Whether this process writes the run's files (checkpoints, artifact): always, except
    on the non-chief workers of a multi-worker cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                             and "chief" not in resolver.cluster_spec().as_dict())


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there or unreadable)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def resolve_precision(name: str, gpus=None, flags: frozenset[str] | None = None) -> str:
    """`auto` → `bf16` where every device computes bfloat16 natively (GPUs of compute capability
    8.0 or newer; without a GPU, a CPU with CPU_BF16_FLAGS), else `none`; any other name as is.
    `gpus` (compute capabilities) and `flags` default to this machine's."""
    if name != "auto":
        return name
    if gpus is None:
        import tensorflow as tf

        gpus = [tf.config.experimental.get_device_details(g).get("compute_capability", (0, 0))
                for g in tf.config.list_physical_devices("GPU")]
    if gpus:
        return "bf16" if all(tuple(c) >= (8, 0) for c in gpus) else "none"
    return "bf16" if CPU_BF16_FLAGS & (cpu_flags() if flags is None else flags) else "none"


def resolve_jit(name: str, precision: str, steps: int, gpus=None,
                flags: frozenset[str] | None = None) -> str:
    """`--jit-compile auto` → `on` (XLA) for a float32 run of at least XLA_MIN_STEPS on a CPU
    without AVX-512, else `off`; with a GPU, `auto` stays `auto`: Keras' own choice (XLA where
    every layer supports it). Measured at 160² (bench/bench_training_step.py): XLA takes 0.83×
    the float32 step on an AVX2-only CPU but 1.36× on one with AVX-512, where oneDNN's kernels
    win; in bf16 on a CPU (AMX) XLA took 1.92×. `on`/`off` as named. `gpus` and `flags`
    default to this machine's."""
    if name != "auto":
        return name
    if gpus is None:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return "auto"
    avx512 = "avx512f" in (cpu_flags() if flags is None else flags)
    return "on" if precision == "none" and steps >= XLA_MIN_STEPS and not avx512 else "off"


@contextlib.contextmanager
def precision(name: str = "none"):
    """Keras' global dtype policy for the block (`bf16`: mixed_bfloat16, for GPUs from
    Ampere and TPUs; `fp16`: mixed_float16 with loss scaling, which Keras adds at compile);
    float32 again afterwards. Variables stay float32; the output layer computes in float32."""
    import keras

    if name not in PRECISIONS:
        raise ValueError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, not {name!r}")
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISIONS[name])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)
