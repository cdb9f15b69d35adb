"""Scoring pipeline against the raw model, time to alert, worker memory (a benchmark, not a test).

All figures come from one run on this machine:
1. raw model: images/s of a `tf.function` forward of the same InceptionV3 on ready tensors
   at the same batch size;
2. pipeline: slices/s of the real scoring worker (Procfile command, solo pool) draining a
   queue of 512×512 CT slices from Redis at steady state (timestamps from the results it
   wrote), and their ratio (target ≥ 0.85), with the mean batch size and the worker's RSS;
3. time to alert: a positive slice (an untrained network scores `any` ≈ 0.5 > 0.15) arriving
   alone at an idle worker, and again under a background load of 50 % of the measured
   pipeline throughput: p50/p95 of receipt → webhook accepted.

    .venv/bin/python bench/bench_worker.py [--size 224] [--n 640] [--probes 10]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import redis  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from ich import keys  # noqa: E402
from ich.model import ModelCard, build_model, promote, save_artifact  # noqa: E402
from ich.queue import SliceMeta, SliceQueue  # noqa: E402
from tests.services import (  # noqa: E402
    RedisServer, ServiceProcess, WebhookReceiver, free_port, histogram_quantile, memory_mib,
    metrics_text, procfile,
)
from training.synthetic import make_study, to_bytes  # noqa: E402

BATCH = 32


def raw_model_rate(model, size: int, batches: int = 6) -> float:
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True,
                          input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)])
    x = tf.constant(np.random.default_rng(0).random((BATCH, size, size, 3), dtype=np.float32))
    forward(x)  # trace and warm up
    times = []
    for _ in range(batches):
        t = time.perf_counter()
        forward(x).numpy()
        times.append(time.perf_counter() - t)
    return BATCH / statistics.median(times)


class Feeder:
    """Queues slices as the listener would, reusing a few real phantom slices' bytes."""

    def __init__(self, client: redis.Redis) -> None:
        self.queue = SliceQueue(client, 10**7, 3600)
        self.blobs = [to_bytes(s.dataset) for s in make_study(9, 0, slices=(24, 24), variant="default")]

    def send(self, study: str, i: int) -> SliceMeta:
        meta = SliceMeta(study, "1.2.3", generate_uid(), instance_number=i)
        self.queue.enqueue(self.blobs[i % len(self.blobs)], meta)
        return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--n", type=int, default=20 * BATCH)
    parser.add_argument("--probes", type=int, default=10)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-worker-"))

    model = build_model("InceptionV3", args.size)
    raw = raw_model_rate(model, args.size)
    model_dir = tmp / "models"
    promote(save_artifact(model, ModelCard(version="bench-untrained", input_size=args.size), model_dir),
            model_dir / "current")
    del model

    server = RedisServer(tmp / "redis").start()
    client = redis.Redis.from_url(server.url)
    receiver = WebhookReceiver()
    ports = {"worker": free_port(), "alerts": free_port()}
    env = {"ICH_REDIS_URL": server.url, "ICH_MODEL_DIR": str(model_dir / "current"),
           "ICH_BATCH_MAX": str(BATCH), "ICH_BATCH_WINDOW_MS": "50",
           "ICH_WORKER_METRICS_PORT": str(ports["worker"]), "ICH_ALERTS_METRICS_PORT": str(ports["alerts"]),
           "ICH_WEBHOOK_URLS": receiver.url, "ICH_WEBHOOK_SECRET": "bench-secret",
           "ICH_STUDY_QUIET_S": "3600", "ICH_LOG_LEVEL": "WARNING",
           "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    commands = {name: ["bash", "-c", "exec " + line] for name, line in procfile().items()}
    worker = ServiceProcess(commands["worker"], env, tmp / "worker.log", python=False)
    alerts = ServiceProcess(commands["alerts"], env, tmp / "alerts.log", python=False)
    feeder = Feeder(client)
    try:
        worker.start(wait_port=ports["worker"], timeout=300)
        alerts.start(wait_port=ports["alerts"], timeout=120)

        # --- 2. throughput at steady state -----------------------------------------------
        study = generate_uid()
        for i in range(args.n):
            feeder.send(study, i)
        rss = [memory_mib(worker.proc.pid)]
        while client.hlen(keys.study_results(study)) < args.n:
            time.sleep(0.5)
            rss.append(memory_mib(worker.proc.pid))
        done = sorted(json.loads(v)["scored_at"] for v in client.hvals(keys.study_results(study)))
        first_batch_end = done[BATCH - 1]
        steady = [t for t in done if t > first_batch_end]
        pipeline = len(steady) / (done[-1] - first_batch_end)
        metrics = metrics_text(ports["worker"])
        mean_batch = metrics["ich_batch_size_sum"] / metrics["ich_batch_size_count"]

        # --- 3. time to alert ------------------------------------------------------------
        def probe() -> float:
            meta = feeder.send(generate_uid(), 0)
            deadline = time.time() + 60
            while time.time() < deadline:
                for r in receiver.requests:
                    body = json.loads(r["body"])
                    if body["study_instance_uid"] == meta.study_instance_uid:
                        return r["at"] - meta.received_at
                time.sleep(0.01)
            raise TimeoutError("no alert within 60 s")

        idle = [probe() for _ in range(args.probes)]
        stop = threading.Event()

        def background() -> None:  # 50 % of the measured pipeline throughput
            interval, i, load_study = 2.0 / pipeline, 0, generate_uid()
            while not stop.is_set():
                feeder.send(load_study, i)
                i += 1
                stop.wait(interval)

        loader = threading.Thread(target=background, daemon=True)
        loader.start()
        time.sleep(5)
        loaded = []
        for _ in range(args.probes):
            loaded.append(probe())
            time.sleep(1.0)
        stop.set()
        loader.join()
        inference_p50 = histogram_quantile(metrics, "ich_inference_seconds", 0.5)
    finally:
        worker.stop()
        alerts.stop()
        receiver.close()
        server.stop()

    print(f"InceptionV3 {args.size}x{args.size}, batch {BATCH}, CPU, one worker process (solo pool)")
    print(f"raw model, tf.function on ready tensors : {raw:6.1f} images/s")
    print(f"pipeline, Redis -> scored, steady state  : {pipeline:6.1f} slices/s  "
          f"(ratio {pipeline / raw:.2f}; {args.n} slices of 512x512, mean batch {mean_batch:.1f})")
    print(f"worker RSS start / peak / end            : {rss[0]:.0f} / {max(rss):.0f} / {rss[-1]:.0f} MiB")
    print(f"time to alert, idle worker   p50 / p95   : {_pct(idle, 50):.2f} / {_pct(idle, 95):.2f} s")
    print(f"time to alert, 50% load      p50 / p95   : {_pct(loaded, 50):.2f} / {_pct(loaded, 95):.2f} s")
    print(f"  budget: batch window 0.05 s + one batch inference (p50 bucket ≤ {inference_p50:.2f} s) + 0.5 s")


def _pct(values: list[float], p: int) -> float:
    return float(np.percentile(values, p))


if __name__ == "__main__":
    main()
