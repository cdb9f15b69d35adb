"""Study alerts end to end on unseen phantoms (a measurement, not a test).

A whole node (Redis, then every Procfile process with only ICH_* variables set) serving MODEL
receives N phantom studies from DCMTK `storescu`, one association per study, slices in instance
order (as a scanner sends them), each once the node has scored the previous one. Then `python -m training.evaluate` scores the same files
offline. Printed, from this one run:

- studies with and without a bleed that got a `first_positive` (counts, the false-alert rate);
- whether that set equals the set `training.evaluate` marks positive (the worker and training
  apply one study rule: they must agree);
- time to alert (first positive: receipt of the deciding slice → webhook accepted), p50/p95,
  from the alerts, and the study-level figures `training.evaluate` prints.

    .venv/bin/python bench/bench_study_alerts.py --model models/current --studies 40 --seed 4242
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom  # noqa: E402

from tests.services import (  # noqa: E402
    RedisServer, ServiceProcess, WebhookReceiver, free_port, histogram_quantile, metrics_text, procfile,
)
from training import synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def studies_by_uid(data: Path) -> dict[str, list[tuple[int, Path, int]]]:
    """StudyInstanceUID → [(instance number, file, any label)] in instance order."""
    labels = {}
    for line in (data / synthetic.TRAIN_CSV).read_text().splitlines()[1:]:
        image_label, value = line.split(",")
        image, label = image_label.rsplit("_", 1)
        if label == "any":
            labels[image] = int(value)
    out: dict[str, list] = {}
    for path in sorted((data / synthetic.TRAIN_DIR).glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.setdefault(str(ds.StudyInstanceUID), []).append((int(ds.InstanceNumber), path, labels[path.stem]))
    return {uid: sorted(rows) for uid, rows in out.items()}


def send_study(rows, port: int, tmp: Path) -> float:
    """One association, files in instance order (storescu sends in argument order)."""
    started = time.perf_counter()
    proc = subprocess.run(["storescu", "-aec", "ICHWATCH", "127.0.0.1", str(port),
                           *[str(path) for _, path, _ in rows]],
                          capture_output=True, text=True, timeout=300,
                          env={"TCP_NODELAY": "1", "PATH": os.environ["PATH"]})
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed: {proc.stderr[-500:]}")
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "current")
    ap.add_argument("--studies", type=int, default=40)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--data", type=Path, help="RSNA-layout folder to send (default: generate)")
    ap.add_argument("--gap", type=float, default=0.5, help="idle seconds between studies")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ich-study-bench-"))
    data = args.data or ROOT / "data" / "synthetic" / f"heldout-seed{args.seed}-studies{args.studies}"
    if not (data / synthetic.TRAIN_CSV).is_file():
        synthetic.generate(data, args.studies, args.seed, workers=2)
    by_uid = studies_by_uid(data)

    redis_server = RedisServer(tmp / "redis").start()
    receiver = WebhookReceiver()
    ports = {name: free_port() for name in ("dicom", "listener", "worker", "alerts")}
    env = {"ICH_REDIS_URL": redis_server.url, "ICH_MODEL_DIR": str(args.model.resolve()),
           "ICH_DICOM_PORT": str(ports["dicom"]), "ICH_DICOM_HOST": "127.0.0.1",
           "ICH_LISTENER_METRICS_PORT": str(ports["listener"]),
           "ICH_WORKER_METRICS_PORT": str(ports["worker"]),
           "ICH_ALERTS_METRICS_PORT": str(ports["alerts"]),
           "ICH_WEBHOOK_URLS": receiver.url, "ICH_WEBHOOK_SECRET": "bench-secret",
           "ICH_STUDY_QUIET_S": "3", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    procs = {name: ServiceProcess(["bash", "-c", f"exec {command}"], env, tmp / f"{name}.log", python=False)
             for name, command in procfile().items()}
    wait = {"listener": ports["dicom"], "worker": ports["worker"], "alerts": ports["alerts"]}
    try:
        for name, proc in procs.items():
            proc.start(wait_port=wait[name], timeout=180)
        send_s, sent = [], 0
        for rows in by_uid.values():
            send_s.append(send_study(rows, ports["dicom"], tmp))
            sent += len(rows)
            # Each study arrives at an idle node: wait until the previous one is scored.
            deadline = time.monotonic() + 300
            while metrics_text(ports["worker"]).get("ich_slices_scored_total", 0) < sent:
                if time.monotonic() > deadline:
                    raise TimeoutError("worker did not score the study within 300 s")
                time.sleep(0.1)
            time.sleep(args.gap)

        def summaries():
            return {a["study_instance_uid"] for a in receiver.accepted() if a["kind"] == "study_summary"}

        receiver.wait_for(lambda: summaries() >= set(by_uid), timeout=600)
        time.sleep(2)
        alerts = [a for a in receiver.accepted() if a["kind"] == "first_positive"]
        # receipt of the deciding slice -> the consumer received the POST
        latency = sorted(r["at"] - json.loads(r["body"])["received_at"] for r in receiver.requests
                         if json.loads(r["body"])["kind"] == "first_positive" and r["status"] < 300)
        worker = metrics_text(ports["alerts"])
    finally:
        for proc in procs.values():
            proc.stop()
        receiver.close()
        redis_server.stop()

    evaluated = subprocess.run([sys.executable, "-m", "training.evaluate", "--model", str(args.model),
                                "--data", str(data), "--plots", str(tmp / "plots")],
                               capture_output=True, text=True, timeout=1800)
    if evaluated.returncode != 0:
        print(evaluated.stderr[-2000:], file=sys.stderr)
        return 1
    offline = json.loads(evaluated.stdout)
    alerted = {a["study_instance_uid"] for a in alerts}
    bleeding = {uid for uid, rows in by_uid.items() if any(y for _, _, y in rows)}
    normal = set(by_uid) - bleeding
    p95 = latency[min(len(latency) - 1, round(0.95 * (len(latency) - 1)))] if latency else None
    study = offline["study"]
    print(f"model {offline['model']}, rule {study['rule']}, any threshold {study['per_label']['any']['threshold']:.4g}")
    print(f"studies sent: {len(by_uid)} ({len(bleeding)} with a bleed, {len(normal)} without), "
          f"storescu median {statistics.median(send_s):.2f} s per study")
    print(f"first_positive: {len(alerted & bleeding)} of {len(bleeding)} bleeds, "
          f"{len(alerted & normal)} of {len(normal)} normal studies "
          f"({100 * len(alerted & normal) / max(1, len(normal)):.1f} false alerts per 100 normal)")
    print(f"duplicates: {len(alerts) - len(alerted)}")
    same = alerted == set(offline["alerting_studies"])
    print(f"worker's alerting set == training.evaluate's: {same} "
          f"(only worker: {len(alerted - set(offline['alerting_studies']))}, "
          f"only evaluate: {len(set(offline['alerting_studies']) - alerted)})")
    if latency:
        print(f"time to alert (deciding slice received -> webhook accepted): p50 "
              f"{statistics.median(latency):.3f} s, p95 {p95:.3f} s over {len(latency)} alerts; "
              f"ich_time_to_alert_seconds p50 <= {histogram_quantile(worker, 'ich_time_to_alert_seconds', 0.5)} s")
    print("training.evaluate, study level: " + json.dumps(
        {k: study[k] for k in ("studies", "auc", "recall", "specificity", "ppv", "tp", "fn", "tn", "fp",
                               "false_alerts_per_100_normal", "alert_delay_slices")}))
    print(f"slice level: any AUC {offline['per_label']['any']['auc']:.3f}, weighted log loss "
          f"{offline['weighted_log_loss']:.4f} (prevalence {offline['prevalence_log_loss']:.4f})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
