"""What Redis durability costs the listener (a benchmark, not a test): issue 14 item 8.

Success means "the slice is in Redis" (DESIGN §4). With `appendfsync everysec` a crash of the
Redis host can lose up to about a second of slices already answered Success; with `always`,
Redis fsyncs the AOF before it replies, so the listener's Success waits for the disk. Measured
in one run, alternating: one listener, one DCMTK `storescu` association of N 512² slices, into a
private Redis with AOF off, `everysec` and `always`.

    .venv/bin/python bench/bench_redis_fsync.py [--n 300] [--rounds 2]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_listener import timed_send, write_slices  # noqa: E402
from tests.services import RedisServer, ServiceProcess, free_port  # noqa: E402

MODES = (("AOF off", False, "everysec"), ("appendfsync everysec", True, "everysec"),
         ("appendfsync always", True, "always"))


def run(tmp: Path, files, appendonly: bool, fsync: str, name: str) -> float:
    server = RedisServer(tmp / f"redis-{name}", appendonly=appendonly, appendfsync=fsync).start()
    dicom = free_port()
    listener = ServiceProcess(["-m", "dicom_listener"], {
        "ICH_REDIS_URL": server.url, "ICH_DICOM_PORT": str(dicom), "ICH_DICOM_HOST": "127.0.0.1",
        "ICH_LISTENER_METRICS_PORT": "0", "ICH_MAX_QUEUE": str(10 * len(files)),
        "ICH_LOG_LEVEL": "WARNING"}, tmp / f"listener-{name}.log").start(wait_port=dicom)
    try:
        return len(files) / timed_send(dicom, "ICHWATCH", [files])
    finally:
        listener.stop()
        server.stop()
        shutil.rmtree(tmp / f"redis-{name}", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fsync-"))
    try:
        files = write_slices(tmp / "in", args.n)
        rates: dict[str, list[float]] = {name: [] for name, _, _ in MODES}
        for r in range(args.rounds):
            for name, appendonly, fsync in MODES:
                rates[name].append(run(tmp, files, appendonly, fsync, f"{r}-{fsync}-{appendonly}"))
        base = statistics.median(rates["AOF off"])
        print(f"{args.n} slices of 512x512, one storescu association, {args.rounds} alternating rounds")
        for name, values in rates.items():
            m = statistics.median(values)
            print(f"{name:22s}: {m:6.1f} instances/s (ratio to AOF off {m / base:.2f}; "
                  f"rounds {', '.join(f'{v:.1f}' for v in values)})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
