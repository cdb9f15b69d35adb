"""Slices/s of ich.imaging for 512×512 CT → 224×224×3, one core (a benchmark, not a test).

Reports each stage so a regression points at its cause: parse (bytes → Dataset), decode + HU,
resize, windows, and the whole `load_slice` from bytes, for uncompressed, RLE and JPEG 2000.

    .venv/bin/python bench/bench_imaging.py [--n 200]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom.uid import JPEG2000Lossless, RLELossless  # noqa: E402

from ich import imaging  # noqa: E402
from tests.ctfactory import ct_dataset, head_hu, to_bytes  # noqa: E402


def rate(fn, n: int) -> float:
    fn()  # warm caches (resize matrices, codec plugins)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    base = ct_dataset(head_hu(512))
    raw = to_bytes(base)
    ds = imaging.read_dataset(raw)
    hu = imaging.to_hu(ds)
    small = imaging.resize(hu, args.size)
    stages = {
        "parse bytes": lambda: imaging.read_dataset(raw),
        "decode + HU": lambda: imaging.to_hu(imaging.read_dataset(raw)),
        "resize": lambda: imaging.resize(hu, args.size),
        "windows": lambda: imaging.windows(small),
    }
    for name, fn in stages.items():
        print(f"{name:>28}: {rate(fn, args.n):8.0f} /s")
    for label, syntax in (("uncompressed", None), ("RLE", RLELossless), ("JPEG 2000 lossless", JPEG2000Lossless)):
        ds = ct_dataset(head_hu(512))
        if syntax is not None:
            ds.compress(syntax, encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless else "")
        data = to_bytes(ds)
        n = args.n if syntax is None else max(20, args.n // 5)
        print(f"{'load_slice ' + label:>28}: {rate(lambda: imaging.load_slice(data, args.size), n):8.0f} slices/s"
              f"  (512x512 -> {args.size}x{args.size}x3)")


if __name__ == "__main__":
    main()
