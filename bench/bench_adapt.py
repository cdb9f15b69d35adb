"""What `python -m training.adapt` spends estimating BatchNorm statistics, whole network
against the stem alone (a measurement for `training.adapt.stem_model`, not a test).

The same InceptionV3 (random weights: the cost does not depend on them) and the same fixed
batches, at the shipped input size: `PreciseBatchNorm` over the whole network in training
mode, as adapt ran before, then over `stem_model(model, K)`. Decoding the site's DICOM files is
left out; it is the same for both. Printed: seconds for the first pass (tracing) and for a
second, per path, and the ratio, all from this one run.

    .venv/bin/python bench/bench_adapt.py [--size 160] [--batches 16] [--batch 32] [--layers 5]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--layers", type=int, default=5)
    args = p.parse_args()

    import numpy as np
    import tensorflow as tf

    from ich.model import build_model
    from training.adapt import stem_model
    from training.train import PreciseBatchNorm

    model = build_model("InceptionV3", args.size, weights=None)
    images = np.random.default_rng(0).random((args.batches * args.batch, args.size, args.size, 3),
                                             np.float32)
    batches = tf.data.Dataset.from_tensor_slices(images).batch(args.batch, drop_remainder=True)
    report = {"size": args.size, "slices": len(images), "layers": args.layers}
    for name, upstream in (("whole", model), ("stem", stem_model(model, args.layers))):
        statistics = PreciseBatchNorm(upstream, batches)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            statistics()
            times.append(round(time.perf_counter() - start, 2))
        report[name] = {"batchnorm_layers": len(statistics.layers), "first_s": times[0],
                        "second_s": times[1], "slices_per_s": round(len(images) / times[1], 1)}
    report["stem_over_whole"] = round(report["stem"]["second_s"] / report["whole"]["second_s"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
