"""Phantom generation speed on one core: 512² slices rendered and written as DICOM files.

Why: CI training and the demo generate thousands of slices; the generator must stay well
above the ~50 slices/s that keeps `python -m training.synthetic` a negligible step.

    python bench/bench_synthetic.py [--studies 10] [--seed 0]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from training import synthetic


def bench_default_512(studies: int, seed: int, out: Path) -> tuple[int, float]:
    """Slices and seconds for `studies` default-variant (512², int16) studies, written."""
    start = time.perf_counter()
    slices = 0
    for index in range(studies):
        for sl in synthetic.make_study(seed, index, variant="default"):
            (out / f"{sl.image_id}.dcm").write_bytes(synthetic.to_bytes(sl.dataset))
            slices += 1
    return slices, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    synthetic.study_is_positive(args.seed, 0, 0.14, (24, 36))   # warm the prevalence cache
    with tempfile.TemporaryDirectory() as tmp:
        slices, seconds = bench_default_512(args.studies, args.seed, Path(tmp))
        print(f"512² default, make_study + write, 1 process: {slices} slices in {seconds:.2f} s "
              f"= {slices / seconds:.1f} slices/s")
        summary = synthetic.generate(Path(tmp) / "mixed", args.studies, args.seed, workers=1)
        print(f"generate() all variants, 1 worker: {summary['slices']} slices in "
              f"{summary['seconds']:.2f} s = {summary['slices_per_second']:.1f} slices/s")


if __name__ == "__main__":
    main()
