"""Training at the scale of the real data (issue 13): is decoding still the limit?

Measured in one run on one RSNA-layout phantom folder (default 20,000 slices, generated once
into bench/results/):

1. `training.prepare` with 1 and with 2 processes: slices/s, the scaling, and the time the
   RSNA training set (752,803 slices) would take on a 32-core host at that per-process rate;
2. the per-core DICOM decode rate (`ich.imaging.load_slice`, one thread) against the training
   input pipeline read from the cache alone (no model), in three parts: the shard reads, +
   windows, + HU and geometric augmentation: images/s per core and their ratio to
   the decode rate (target >= 10);
3. `fit` of the same InceptionV3 fed from the cache and from DICOM (training.data.dataset, a
   2-thread decoder), alternating, same model and run: the img/s ratio;
4. peak RSS of a process streaming the training pipeline over 5,000 and over 20,000 cached
   slices (memory must not grow with the data).

    .venv/bin/python bench/bench_training.py [--slices 20000] [--size 224] [--batch 16] [--steps 8]

A benchmark, not a test: figures are printed, nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

RSNA_SLICES = 752_803
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="RSNA-layout folder (default: phantoms in bench/results/)")
    p.add_argument("--slices", type=int, default=20_000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rss-probe", nargs=2, metavar=("CACHE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_probe:
        return rss_probe(Path(args.rss_probe[0]), int(args.rss_probe[1]), args.size)
    data = args.data or phantoms(args.slices)
    caches = {n: RESULTS / f"cache-{n}proc-{args.size}" for n in (1, 2)}
    rates = {n: prepare_rate(data, caches[n], args.size, n) for n in (1, 2)}
    scaling = rates[2] / rates[1]
    per_process = rates[2] / 2
    print(f"prepare scaling 1 -> 2 processes: {scaling:.2f}x (target >= 1.7); RSNA "
          f"({RSNA_SLICES:,} slices) on 32 cores at {per_process:.0f} slices/s per process: "
          f"{RSNA_SLICES / (32 * per_process) / 60:.0f} min")

    from training.cache import SliceCache
    cache = SliceCache.open(caches[2], args.size)
    decode = decode_rate(cache.slices.paths[:400], args.size)
    cores = len(os.sched_getaffinity(0))
    print(f"DICOM decode, 1 thread: {decode:.0f} slices/s per core")
    for label, augment in (("reads only (float16 HU, --augment-on device)", None), ("reads + windows", False),
                           ("HU augment + windows + geometric augment", True)):
        pipeline = pipeline_rate(cache, args.batch * 4, batches=60, augment=augment)
        print(f"cache pipeline, {label}, {cores} cores: {pipeline:.0f} img/s = {pipeline / cores:.0f} "
              f"per core = {pipeline / cores / decode:.1f}x the decode rate (target >= 10)")
    fit_ratio(cache, args)
    for n in (5_000, min(20_000, len(cache.slices))):
        out = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--rss-probe",
                              str(cache.root), str(n)], capture_output=True, text=True, check=True)
        print(out.stdout.strip())


def phantoms(slices: int) -> Path:
    """An RSNA-layout phantom folder of at least `slices` slices (generated once)."""
    from training import synthetic

    folder = RESULTS / f"phantoms-{slices}"
    if not (folder / "stage_2_train.csv").is_file():
        started = time.perf_counter()
        summary = synthetic.generate(folder, studies=slices // 30 + 1, seed=13, workers=os.cpu_count())
        print(f"generated {summary['slices']} phantom slices in {time.perf_counter() - started:.0f} s")
    return folder


def prepare_rate(data: Path, out: Path, size: int, processes: int) -> float:
    from training.prepare import prepare

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    cache = prepare(data, out, size, processes)
    seconds = time.perf_counter() - started
    n = int(cache.meta["images"])
    print(f"prepare, {processes} process(es): {n} slices in {seconds:.0f} s = {n / seconds:.0f} slices/s")
    return n / seconds


def decode_rate(paths, size: int) -> float:
    from threadpoolctl import threadpool_limits

    from ich.imaging import load_slice

    with threadpool_limits(1):
        started = time.perf_counter()
        for path in paths:
            load_slice(path, size)
        return len(paths) / (time.perf_counter() - started)


def pipeline_rate(cache, batch: int, batches: int, augment: bool | None) -> float:
    """Images/s of the training pipeline; `augment` None: the shard reads alone, all that
    stays on the CPU when windows and augmentation run on the accelerator."""
    from training.data import HUAugment

    if augment is None:   # what `--augment-on device` feeds: float16 HU and labels
        ds = cache.batches(cache.slices, batch, training=True, seed=0, raw=True, positive_fraction=0.3)
    else:
        ds = cache.batches(cache.slices, batch, training=True, seed=0, augment=augment,
                           hu_augment=HUAugment() if augment else None, positive_fraction=0.3)
    it = iter(ds)
    for _ in range(5):
        next(it)
    started = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - started)


def fit_ratio(cache, args) -> None:
    import keras

    from ich.model import build_model
    from training.data import Decoder, HUAugment, dataset

    keras.utils.set_random_seed(0)
    slices = cache.slices.take(np.arange(min(len(cache.slices), 4000)))
    model = build_model("InceptionV3", args.size, None, bn_momentum=0.9)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    feeds = {
        "cache": lambda: cache.batches(slices, args.batch, training=True, seed=0, augment=True,
                                       hu_augment=HUAugment()),
        "DICOM": lambda: dataset(slices, Decoder(slices.paths, args.size), args.batch, training=True,
                                 seed=0, augment=True, workers=2),
    }
    model.fit(feeds["cache"](), epochs=1, steps_per_epoch=2, verbose=0)      # trace once
    rates: dict[str, list[float]] = {name: [] for name in feeds}
    for _ in range(args.rounds):
        for name, feed in feeds.items():
            rates[name].append(fit_rate(model, feed(), args.steps, args.batch))
    for name, values in rates.items():
        print(f"fit from {name:>5}: {statistics.median(values):6.2f} img/s (rounds: "
              f"{', '.join(f'{v:.2f}' for v in values)})")
    print(f"fit img/s, cache / DICOM: {statistics.median(rates['cache']) / statistics.median(rates['DICOM']):.2f}")


def fit_rate(model, data, steps: int, batch: int) -> float:
    """Images/s of one `fit` of steps + 1 steps, the first (pipeline warm-up) not counted."""
    import keras

    times: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch_index, logs=None):
            times.append(time.perf_counter())

    model.fit(data, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[Clock()])
    return steps * batch / (times[-1] - times[0])


def rss_probe(root: Path, n: int, size: int) -> None:
    """In its own process: stream 150 training batches of 64 over the first n cached slices."""
    from training.cache import SliceCache
    from training.data import HUAugment

    cache = SliceCache.open(root, size)
    slices = cache.slices.take(np.arange(n))
    it = iter(cache.batches(slices, 64, training=True, seed=0, augment=True, hu_augment=HUAugment()))
    for _ in range(150):
        next(it)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rss_probe_slices": n, "peak_rss_mib": round(peak)}))


if __name__ == "__main__":
    main()
