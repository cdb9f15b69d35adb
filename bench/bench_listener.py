"""Listener throughput against DCMTK's storescp, measured in one run (a benchmark, not a test).

Sends the same 512×512 CT phantom slices with DCMTK `storescu` (one association, TCP_NODELAY
on, as DESIGN §6 measured) to (a) DCMTK `storescp` writing files to disk, (b) a bare pynetdicom
SCP whose handler only returns Success (the ceiling of any pynetdicom listener; same socket
settings as ours) and (c) our listener queueing into a private Redis, then (d) from 4 concurrent
`storescu` to one listener process and (e) to `python -m dicom_listener --processes 2` (two
processes sharing the port with SO_REUSEPORT, one /metrics).
Prints instances/s, the ratios, the handler p99 from the listener's own histogram, and its
peak RSS.

    .venv/bin/python bench/bench_listener.py [--n 500]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402

from ich import keys  # noqa: E402
from tests.services import (  # noqa: E402
    RedisServer, ServiceProcess, free_port, histogram_quantile, memory_mib, metrics_text, wait_for_port,
)
from training.synthetic import make_study, to_bytes  # noqa: E402

ENV = {"TCP_NODELAY": "1", "PATH": os.environ["PATH"]}

#: (b): pynetdicom with our AE, PDU size, Nagle off and bulk reads, and a handler that stores
#: nothing: what pynetdicom itself costs per instance.
BARE_SCP = """
import socket, sys, threading
from pynetdicom import evt
from dicom_listener import server
from ich.settings import Settings

def nodelay(event):
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

settings = Settings.from_env(dicom_port=int(sys.argv[1]), dicom_host="127.0.0.1")
server.start(server.build_ae(settings), settings,
             [(evt.EVT_CONN_OPEN, nodelay), (evt.EVT_C_STORE, lambda event: 0x0000)])
threading.Event().wait()
"""


def write_slices(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    files: list[Path] = []
    index = 0
    while len(files) < n:
        for s in make_study(5, index, variant="default"):
            path = folder / f"{s.image_id}.dcm"
            path.write_bytes(to_bytes(s.dataset))
            files.append(path)
        index += 1
    for extra in files[n:]:
        extra.unlink()
    return files[:n]


def storescu(port: int, aet: str, paths: list[Path]) -> subprocess.Popen:
    return subprocess.Popen(["storescu", "-aec", aet, "127.0.0.1", str(port), *map(str, paths)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def timed_send(port: int, aet: str, shares: list[list[Path]]) -> float:
    start = time.perf_counter()
    procs = [storescu(port, aet, share) for share in shares]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-listener-"))
    try:
        files = write_slices(tmp / "in", args.n)
        mb = sum(f.stat().st_size for f in files) / 2**20
        print(f"{len(files)} slices, 512x512 int16, {mb:.0f} MiB")

        port = free_port()
        (tmp / "out").mkdir()
        scp = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(tmp / "out"), str(port)],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port)
        dcmtk_s = timed_send(port, "STORESCP", [files])
        scp.terminate()
        scp.wait()

        port = free_port()
        bare = subprocess.Popen([sys.executable, "-c", BARE_SCP, str(port)],
                                cwd=Path(__file__).resolve().parents[1],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port, timeout=30)
            bare_s = timed_send(port, "ICHWATCH", [files])
        finally:
            bare.terminate()
            bare.wait()

        server = RedisServer(tmp / "redis").start()
        client = redis.Redis.from_url(server.url)
        dicom = free_port()

        def listener(name: str, processes: int = 1) -> tuple[ServiceProcess, int]:
            metrics_port = free_port()
            return ServiceProcess(["-m", "dicom_listener", "--processes", str(processes)], {
                "ICH_REDIS_URL": server.url, "ICH_DICOM_PORT": str(dicom), "ICH_DICOM_HOST": "127.0.0.1",
                "ICH_LISTENER_METRICS_PORT": str(metrics_port), "ICH_MAX_QUEUE": str(10 * args.n),
                "ICH_LOG_LEVEL": "WARNING"}, tmp / f"{name}.log").start(wait_port=dicom), metrics_port

        first, metrics_port = listener("listener-1")
        second = None
        try:
            one_s = timed_send(dicom, "ICHWATCH", [files])
            assert client.llen(keys.SCORE_QUEUE) == len(files), "not every slice was queued"
            m1 = metrics_text(metrics_port)
            client.flushall()
            four_s = timed_send(dicom, "ICHWATCH", [files[i::4] for i in range(4)])
            assert client.llen(keys.SCORE_QUEUE) == len(files)
            m4 = metrics_text(metrics_port)
            rss = memory_mib(first.proc.pid, "VmHWM")
            client.flushall()
            first.stop()
            first = None
            second, pool_metrics = listener("listener-pool", processes=2)
            time.sleep(3.0)   # the second child binds the port too
            two_procs_s = timed_send(dicom, "ICHWATCH", [files[i::4] for i in range(4)])
            assert client.llen(keys.SCORE_QUEUE) == len(files)
            assert metrics_text(pool_metrics)["ich_instances_queued_total"] == len(files)
        finally:
            for proc in (first, second):
                if proc:
                    proc.stop()
            server.stop()

        n = len(files)
        rate_dcmtk, rate_one, rate_four = n / dcmtk_s, n / one_s, n / four_s
        print(f"DCMTK storescp -> disk, 1 association : {rate_dcmtk:7.1f} instances/s")
        print(f"bare pynetdicom SCP,   1 association : {n / bare_s:7.1f} instances/s  "
              f"(ratio to storescp {n / bare_s / rate_dcmtk:.2f})")
        print(f"listener -> Redis,     1 association : {rate_one:7.1f} instances/s  "
              f"(ratio to storescp {rate_one / rate_dcmtk:.2f}, to bare pynetdicom {rate_one * bare_s / n:.2f})")
        print(f"listener -> Redis,     4 associations: {rate_four:7.1f} instances/s  "
              f"(x{rate_four / rate_one:.2f} of one association)")
        print(f"--processes 2,         4 associations: {n / two_procs_s:7.1f} instances/s  "
              f"(x{one_s / two_procs_s:.2f} of one association, x{four_s / two_procs_s:.2f} of one "
              "process; /metrics summed over both)")
        print(f"handler p50/p99, 1 association : {histogram_quantile(m1, 'ich_store_handler_seconds', 0.5) * 1e3:.0f}"
              f" / {histogram_quantile(m1, 'ich_store_handler_seconds', 0.99) * 1e3:.0f} ms (histogram bucket bounds)")
        print(f"handler p99, both runs        : {histogram_quantile(m4, 'ich_store_handler_seconds', 0.99) * 1e3:.0f} ms")
        print(f"listener peak RSS             : {rss:.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
