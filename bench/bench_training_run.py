"""Training at scale, end to end (issue 13's "done when"): the real `python -m training` on a
prepared cache of a 20,000-slice phantom folder, killed after its first checkpoint and resumed,
and the same command on 5,000 of those slices, each with its peak RSS.

    .venv/bin/python bench/bench_training_run.py [--slices 20000] [--size 128] [--steps 40]

1. `training.prepare` (every core) of the folder, and of a 5,000-slice folder made of the first
   studies of the same one (hard links; its own label file);
2. `python -m training --data CACHE` with a short schedule (epochs x steps), SIGKILLed at its
   first "checkpoint: epoch 1 saved" line, then `--resume`d to the end: wall time of each
   part, training img/s from the progress lines, the resumed epoch, peak RSS of each process;
3. the uninterrupted command on the 5,000-slice cache: peak RSS, to compare with 20,000.

Calibration and test (40 % of the studies) are scored in full by every run, streamed from the
cache: that, not the short schedule, is what would grow with the data if anything were held.
A benchmark, not a test: figures are printed, nothing is asserted.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.bench_training import RESULTS, phantoms  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=20_000)
    p.add_argument("--small", type=int, default=5_000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    from training.prepare import prepare

    big = phantoms(args.slices)
    small = subset(big, RESULTS / f"phantoms-{args.small}-of-{args.slices}", args.small)
    caches = {}
    for name, folder in (("big", big), ("small", small)):
        out = RESULTS / f"cache-run-{folder.name}-{args.size}"
        started = time.perf_counter()
        cache = prepare(folder, out, args.size, os.cpu_count())
        print(f"prepare {folder.name}: {cache.meta['images']} slices in "
              f"{time.perf_counter() - started:.0f} s ({os.cpu_count()} processes)", flush=True)
        caches[name] = out
    models = RESULTS / "run-models"
    shutil.rmtree(models, ignore_errors=True)
    common = ["--input-size", str(args.size), "--epochs", str(args.epochs),
              "--steps-per-epoch", str(args.steps), "--validate-from", "1", "--out", str(models),
              "--verbose", "2", "--allow-failed", "--seed", "7"]

    # 2. The big cache: killed after epoch 1, resumed.
    argv = [sys.executable, "-m", "training", "--data", str(caches["big"]), "--version", "run-big", *common]
    first, lines, took, peak = run(argv, kill_at=r"checkpoint: epoch 1 saved")
    print(f"20k run, first part: killed after epoch 1 at {took:.0f} s; peak RSS {peak:.0f} MiB; "
          f"{rate(lines)}", flush=True)
    resumed, lines, took, peak = run([sys.executable, "-m", "training", "--resume",
                                      str(models / "runs" / "run-big")])
    at = next((ln.strip() for ln in lines if "resuming at epoch" in ln), "no resume line")
    print(f"20k run, resumed: exit {resumed}, {took:.0f} s; peak RSS {peak:.0f} MiB; {rate(lines)}; {at}")
    with open(models / "run-big" / "history.csv", newline="") as f:
        print(f"  history.csv epochs: {[r['epoch'] for r in csv.DictReader(f)]}")
    big_peak = peak

    # 3. The small cache, uninterrupted.
    argv = [sys.executable, "-m", "training", "--data", str(caches["small"]), "--version", "run-small", *common]
    code, lines, took, peak = run(argv)
    print(f"5k run: exit {code}, {took:.0f} s; peak RSS {peak:.0f} MiB; {rate(lines)}")
    print(f"peak RSS of a full training process, 5k vs 20k slices: {peak:.0f} vs {big_peak:.0f} MiB "
          f"(ratio {big_peak / peak:.2f})")


def subset(folder: Path, out: Path, slices: int) -> Path:
    """The first studies of `folder` up to `slices` slices, as an RSNA-layout folder of hard
    links with its own label file (a study is never cut)."""
    from training.data import read_trainset, study_uids

    if (out / "stage_2_train.csv").is_file():
        return out
    trainset = read_trainset(folder / "stage_2_train.csv")
    studies = study_uids(trainset.paths)
    chosen, total = set(), 0
    for study, count in zip(*np.unique(studies, return_counts=True)):
        if total >= slices:
            break
        chosen.add(study)
        total += int(count)
    keep = {image_id for image_id, study in zip(trainset.ids, studies) if study in chosen}
    (out / "stage_2_train").mkdir(parents=True, exist_ok=True)
    with open(folder / "stage_2_train.csv") as src, open(out / "stage_2_train.csv", "w") as dst:
        for n, line in enumerate(src):
            if n == 0 or line.split(",")[0].rsplit("_", 1)[0] in keep:
                dst.write(line)
    for image_id in keep:
        target = out / "stage_2_train" / f"{image_id}.dcm"
        if not target.exists():
            os.link(folder / "stage_2_train" / f"{image_id}.dcm", target)
    return out


def run(argv: list[str], kill_at: str | None = None) -> tuple[int, list[str], float, float]:
    """Run one training process under GNU time (its peak RSS); SIGKILL the training process
    (time's child) at the first stderr line matching `kill_at`, as an OOM kill would.
    Returns (exit code, stderr lines, seconds, peak RSS MiB)."""
    started = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "peak_rss_kb %M", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []   # progress lines (stdout), log lines (stderr) and GNU time's, in one stream
    for line in proc.stdout:
        lines.append(line)
        if kill_at and re.search(kill_at, line):
            for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
                os.kill(int(child), signal.SIGKILL)
            kill_at = None
    proc.wait()
    peak = next((int(ln.split()[1]) / 1024 for ln in lines if ln.startswith("peak_rss_kb")), float("nan"))
    return proc.returncode, lines, time.perf_counter() - started, peak


def rate(lines: list[str]) -> str:
    rates = [float(m.group(1)) for ln in lines if (m := re.search(r"([\d.]+) img/s", ln))]
    return f"training {sorted(rates)[len(rates) // 2]:.1f} img/s (median of {len(rates)} progress lines)" \
        if rates else "no progress lines"


if __name__ == "__main__":
    main()
