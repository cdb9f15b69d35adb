"""The training step's cost on this machine: float32 with and without XLA, and bf16 where the
CPU computes it natively, each with BatchNorm on the fused kernel (training.fused_bn, as
training runs) and without XLA on Keras' own layers (a measurement for `--jit-compile auto`,
`--mixed-precision auto` and `--fused-batch-norm`, not a test).

One InceptionV3 from scratch per setting, compiled as `training.train.MyDeepModel` compiles it
(Adam with the recipe's weight EMA, BatchNorm momentum 0.9), fed one fixed batch: what the
step itself costs, without the input pipeline. Printed per input size: the first step
(tracing and compiling) and the mean of the next `--steps`, in seconds, and the ratios of each
setting to plain float32, all from this one run. Each setting runs in its own process so
that the dtype policy and XLA's caches do not carry over.

    .venv/bin/python bench/bench_training_step.py [--sizes 128 160] [--batch 32] [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_time(size: int, batch: int, steps: int, precision: str, jit: str, fused: bool) -> dict:
    """In this process: (first step, mean later step) seconds of one setting."""
    import numpy as np

    from training.distribute import precision as policy
    from training.train import MyDeepModel

    with policy(precision):
        deep = MyDeepModel(input_dims=(size, size, 3), batch_size=batch, learning_rate=1e-3,
                           bn_momentum=0.9, ema=0.99, verbose=0, jit_compile=jit,
                           fused_batch_norm=fused)
    rng = np.random.default_rng(0)
    x, y = rng.random((batch, size, size, 3), np.float32), np.zeros((batch, 6), np.float32)
    started = time.perf_counter()
    deep.model.train_on_batch(x, y)
    first = time.perf_counter() - started
    deep.model.train_on_batch(x, y)
    started = time.perf_counter()
    for _ in range(steps):
        deep.model.train_on_batch(x, y)
    return {"first": first, "step": (time.perf_counter() - started) / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 160])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--one", nargs=3, metavar=("PRECISION", "JIT", "FUSED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        precision, jit, fused = args.one
        print(json.dumps(step_time(args.sizes[0], args.batch, args.steps, precision, jit, fused == "fused")))
        return
    from training.distribute import resolve_precision

    precisions = ["none"] + (["bf16"] if resolve_precision("auto", gpus=[]) == "bf16" else [])  # native bf16
    settings = [(precision, jit, bn) for precision in precisions for jit, bn in
                (("off", "fused"), ("on", "fused"), ("off", "keras"))]
    for size in args.sizes:
        times = {}
        for setting in settings:
            out = subprocess.run([sys.executable, __file__, "--sizes", str(size), "--batch", str(args.batch),
                                  "--steps", str(args.steps), "--one", *setting],
                                 capture_output=True, text=True, check=True)
            times[setting] = json.loads(out.stdout.strip().splitlines()[-1])
        base = times["none", "off", "fused"]["step"]
        for (precision, jit, bn), t in times.items():
            name = ({"none": "float32", "bf16": "bf16"}[precision] + (" + XLA" if jit == "on" else "")
                    + (", Keras BN" if bn == "keras" else ""))
            print(f"{size}² batch {args.batch} {name:24s}: first step {t['first']:5.1f} s, "
                  f"then {t['step']:.3f} s/step = {t['step'] / base:.2f}x float32")


if __name__ == "__main__":
    main()
