"""Does the input pipeline starve training? Images/s of `fit` fed from DICOM files through
training.data (parallel decode with ich.imaging + augmentation, no cache) ÷ images/s of the same
`fit` on in-memory tensors: same model, batch size and run. Target ≥ 0.8 (a benchmark, not a test).

    .venv/bin/python bench/bench_training.py [--size 128] [--batch 32] [--steps 12] [--rounds 2]
                                             [--blas-threads 1]

The model is traced once on in-memory data; then the two feeds alternate for `rounds` rounds of
`steps` timed steps each (the first step of each fit is dropped), and medians are compared.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="RSNA-layout folder (default: generate phantoms)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS threads per process, as MyDeepModel.fit_model sets (0: leave as is)")
    args = parser.parse_args()
    if args.blas_threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.blas_threads, user_api="blas")

    import keras
    import tensorflow as tf

    from ich.model import build_model
    from training import synthetic
    from training.data import Decoder, dataset, read_trainset

    keras.utils.set_random_seed(0)
    data = args.data
    if data is None:
        data = Path(tempfile.mkdtemp(prefix="bench-training-"))
        synthetic.generate(data, studies=12, seed=1, workers=args.workers)
    slices = read_trainset(data)
    n = (args.steps + 1) * args.batch
    slices = slices.take(np.arange(min(len(slices), n)))
    print(f"{len(slices)} slices from {data}, {args.size}², batch {args.batch}, "
          f"{args.workers} decode workers, BLAS threads {args.blas_threads or 'default'}, "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or 'all'} TF threads")

    decoder = Decoder(slices.paths, args.size)
    x = np.stack([decoder(i)[0] for i in range(len(slices))])
    memory = tf.data.Dataset.from_tensor_slices((x, slices.labels)).shuffle(len(x), seed=0) \
        .repeat().batch(args.batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def pipeline():  # a fresh decoder: every image is read and decoded from its file
        return dataset(slices, Decoder(slices.paths, args.size), args.batch, training=True,
                       seed=0, augment=True, workers=args.workers)

    model = build_model("InceptionV3", args.size, None, bn_momentum=0.9)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    start = time.perf_counter()
    model.fit(memory, epochs=1, steps_per_epoch=2, verbose=0)
    print(f"trace + 2 steps: {time.perf_counter() - start:.0f} s")

    rates: dict[str, list[float]] = {"in-memory tensors": [], "DICOM pipeline": []}
    for _ in range(args.rounds):
        rates["in-memory tensors"].append(fit_rate(model, memory, args.steps, args.batch))
        rates["DICOM pipeline"].append(fit_rate(model, pipeline(), args.steps, args.batch))
    for name, values in rates.items():
        print(f"{name:>18}: {statistics.median(values):6.2f} img/s  (rounds: {', '.join(f'{v:.2f}' for v in values)})")
    ratio = statistics.median(rates["DICOM pipeline"]) / statistics.median(rates["in-memory tensors"])
    print(f"ratio pipeline / in-memory: {ratio:.2f}  (target >= 0.8)")


def fit_rate(model, data, steps: int, batch: int) -> float:
    """Images/s of one `fit` of steps + 1 steps, the first (pipeline warm-up) not counted."""
    import keras

    times: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch_index, logs=None):
            times.append(time.perf_counter())

    model.fit(data, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[Clock()])
    return steps * batch / (times[-1] - times[0])


if __name__ == "__main__":
    main()
