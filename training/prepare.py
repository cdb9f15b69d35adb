"""`python -m training.prepare`: decode every slice of an RSNA-layout folder once, into a cache.

    python -m training.prepare --data /data/rsna --out /data/rsna-cache-224 --input-size 224

pydicom parsing is Python and holds the GIL (~300 slices/s per core, bench/bench_imaging.py),
so a process pool decodes (every core by default). Each slice goes through
`ich.imaging.load_hu`, the worker's own code path; the cache keeps its HU at the input size
(training/cache.py says why and how it is laid out) with the study, series, z and instance
number read in the same pass, so a study split never opens a header again. Workers write
their rows straight into the shard file; a shard's JSON, written last, marks it done, so
re-running after an interruption skips finished shards. Progress goes to stderr, one line per
shard, with slices/s and the time left.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from ich.imaging import PREPROCESSING_VERSION
from training.cache import (DTYPE, FORMAT, MANIFEST_FIELDS, MANIFEST_FILE, META_FILE, SHARD_DIR,
                            CacheError, SliceCache, check_meta, is_cache, read_meta, shard_path)
from training.data import TRAIN_CSV, DataError, _number, read_trainset

log = logging.getLogger("training.prepare")

#: Slices per shard: 4,096 × 98 KiB = 392 MiB at 224² (RSNA: 184 shards); a task is a chunk.
SHARD_SIZE, CHUNK = 4096, 64


def prepare(data: Path, out: Path, input_size: int, processes: int | None = None,
            shard_size: int = SHARD_SIZE) -> SliceCache:
    """Prepare (or finish preparing) the cache of `data` in `out`; returns it opened."""
    data, out = Path(data), Path(out)
    trainset = read_trainset(data)            # an unreadable label file fails here, at once
    if not len(trainset):
        raise DataError(f"{data}: no labelled images on disk")
    digest = _digest(data / TRAIN_CSV if data.is_dir() else data)
    meta = {"format": FORMAT, "input_size": int(input_size), "dtype": np.dtype(DTYPE).name,
            "preprocessing_version": PREPROCESSING_VERSION, "shard_size": int(shard_size),
            "source": str(data.resolve()), "labels_sha256": digest, "images": len(trainset),
            "shards": math.ceil(len(trainset) / shard_size), "read": trainset.report()}
    if is_cache(out):
        old = read_meta(out)
        check_meta(out, old, input_size)
        for key in ("labels_sha256", "images"):
            if old.get(key) != meta[key]:
                raise CacheError(f"{out} holds a cache of other data ({key} {old.get(key)} != "
                                 f"{meta[key]}): choose another cache folder or delete it")
        if old.get("complete"):
            log.info("%s is complete: %d slices", out, old["images"])
            return SliceCache.open(out, input_size)
        shard_size = int(old["shard_size"])      # finish it as it was begun
        meta.update(shard_size=shard_size, shards=math.ceil(len(trainset) / shard_size))
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    _write_json(out / META_FILE, {**meta, "complete": False})
    started = time.perf_counter()
    processed = _decode_shards(out, trainset.paths, input_size, shard_size,
                               processes or os.cpu_count() or 1)
    seconds = time.perf_counter() - started
    failures = _write_manifest(out, trainset, meta["shards"])
    _write_json(out / META_FILE, {**meta, "complete": True, "failed": failures,
                                  "seconds_last_run": round(seconds, 1),
                                  "slices_per_second_last_run": round(processed / seconds, 1) if processed else None})
    log.info("prepared %s: %d slices (%d failed to decode), %d decoded this run in %.0f s",
             out, len(trainset), failures, processed, seconds)
    return SliceCache.open(out, input_size)


def _decode_shards(out: Path, paths: np.ndarray, size: int, shard_size: int, processes: int) -> int:
    """Decode every shard not yet done, keeping about 4 chunks per process in flight."""
    todo = [i for i in range(math.ceil(len(paths) / shard_size))
            if not shard_path(out, i, ".json").is_file()]
    total = sum(min(shard_size, len(paths) - i * shard_size) for i in todo)
    log.info("decoding %d slices in %d shards with %d processes (%d shards already done)",
             total, len(todo), processes, math.ceil(len(paths) / shard_size) - len(todo))
    if not todo:
        return 0
    chunks = ((shard, start, min(start + CHUNK, len(paths), (shard + 1) * shard_size))
              for shard in todo
              for start in range(shard * shard_size, min((shard + 1) * shard_size, len(paths)), CHUNK))
    open_shards: dict[int, dict] = {}
    done = 0
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")    # never fork a process that may hold TF
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker) as pool:
        inflight: dict = {}

        def submit() -> bool:
            item = next(chunks, None)
            if item is None:
                return False
            shard, start, stop = item
            state = open_shards.get(shard)
            if state is None:
                first = shard * shard_size
                n = min(shard_size, len(paths) - first)
                tmp = shard_path(out, shard, ".npy.tmp")
                np.lib.format.open_memmap(tmp, "w+", DTYPE, (n, size, size)).flush()
                state = open_shards[shard] = {"tmp": tmp, "first": first, "pending": 0,
                                              "headers": [None] * n}
            state["pending"] += 1
            future = pool.submit(_decode_chunk, str(state["tmp"]), start - state["first"],
                                 list(paths[start:stop]), size)
            inflight[future] = (shard, start - state["first"])
            return True

        while len(inflight) < 4 * processes and submit():
            pass
        while inflight:
            finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for future in finished:
                shard, offset = inflight.pop(future)
                state = open_shards[shard]
                results = future.result()       # a bug in decoding stops the run, loudly
                state["headers"][offset:offset + len(results)] = results
                state["pending"] -= 1
                done += len(results)
                if state["pending"] == 0 and None not in state["headers"]:
                    _finish_shard(out, shard, state)
                    del open_shards[shard]
                    rate = done / max(time.perf_counter() - started, 1e-9)
                    log.info("shard %d done: %d/%d slices this run, %.0f slices/s, %s left",
                             shard, done, total, rate, _duration((total - done) / rate))
                submit()
    return done


def _finish_shard(out: Path, shard: int, state: dict) -> None:
    os.replace(state["tmp"], shard_path(out, shard))
    _write_json(shard_path(out, shard, ".json"), {"shard": shard, "first": state["first"],
                                                   "rows": state["headers"]})


def _init_worker() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)   # one BLAS thread per process: the pool is the parallelism


def _decode_chunk(shard_file: str, offset: int, paths: list[str], size: int) -> list[list]:
    """Decode `paths` into rows offset.. of a shard file; one [study, series, z, instance,
    reason] per slice (reason "" when decoded)."""
    from ich.imaging import SliceError, load_hu, read_dataset

    shard = np.lib.format.open_memmap(shard_file, "r+")
    out = []
    for i, path in enumerate(paths):
        study = series = ""
        z = instance = math.nan
        try:
            ds = read_dataset(path)
            study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
            z, instance = _number(lambda: ds.ImagePositionPatient[2]), _number(lambda: ds.InstanceNumber)
            shard[offset + i] = load_hu(ds, size)
            reason = ""
        except SliceError as exc:
            reason = exc.reason
        except FileNotFoundError:
            reason = "missing"
        out.append([study or f"unreadable:{path}", series, z, instance, reason])
    shard.flush()
    del shard
    return out


def _write_manifest(out: Path, trainset, shards: int) -> int:
    """manifest.csv from the shard JSONs and the labels; returns the number of failures."""
    failures = 0
    tmp = out / (MANIFEST_FILE + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_FIELDS)
        row = 0
        for shard in range(shards):
            for study, series, z, instance, reason in json.loads(
                    shard_path(out, shard, ".json").read_text())["rows"]:
                failures += bool(reason)
                w.writerow([trainset.ids[row], study, series, _text(z), _text(instance),
                            0 if reason else 1, reason, trainset.paths[row],
                            *(int(v) for v in trainset.labels[row])])
                row += 1
    os.replace(tmp, out / MANIFEST_FILE)
    return failures


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.prepare",
                                description="Decode an RSNA-layout folder once into a training cache.")
    p.add_argument("--data", required=True, type=Path, help="folder with stage_2_train.csv + stage_2_train/")
    p.add_argument("--out", required=True, type=Path, help="cache folder (created; resumed if it exists)")
    p.add_argument("--input-size", required=True, type=int, help="the model's input size (e.g. 224)")
    p.add_argument("--processes", type=int, help="decoding processes (default: every core)")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help=f"slices per shard (default {SHARD_SIZE})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.input_size < 75 or args.shard_size < 1 or (args.processes is not None and args.processes < 1):
        p.error("--input-size must be >= 75, --shard-size and --processes >= 1")
    try:
        cache = prepare(args.data, args.out, args.input_size, args.processes, args.shard_size)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"cache": str(cache.root), "input_size": cache.input_size,
                      "slices": len(cache.slices), "failed": cache.report()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
