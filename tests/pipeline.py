"""A scoring pipeline for tests: private Redis, the scoring and alerts workers started from their
Procfile-equivalent commands, a scripted HTTP consumer, and helpers to queue studies the way
the listener does."""
from __future__ import annotations

import json
import time

import redis
from pydicom.uid import generate_uid

from ich import keys
from ich.queue import SliceMeta, SliceQueue
from tests.ctfactory import ct_dataset, lesion_hu, to_bytes
from tests.services import RedisServer, ServiceProcess, WebhookReceiver, free_port, metrics_text

SECRET = "test-webhook-secret"


class ScriptedReceiver(WebhookReceiver):
    """Answers per study: `script[study_uid]` is a list of statuses, then `default`."""

    def __init__(self) -> None:
        self.script: dict[str, list[int]] = {}
        super().__init__(self.status_for)

    def status_for(self, body: bytes) -> int:
        study = json.loads(body)["study_instance_uid"]
        queue = self.script.get(study)
        return queue.pop(0) if queue else 200


class Pipeline:
    def __init__(self, tmp, redis_server: RedisServer, receiver: WebhookReceiver, model_dir,
                 **env_overrides: str) -> None:
        self.redis = redis_server
        self.receiver = receiver
        self.client = redis.Redis.from_url(redis_server.url)
        self.queue = SliceQueue(self.client, max_depth=100_000, ttl_s=3600)
        self.score_metrics, self.alert_metrics = free_port(), free_port()
        env = {
            "ICH_REDIS_URL": redis_server.url, "ICH_MODEL_DIR": str(model_dir),
            "ICH_WEBHOOK_URLS": receiver.url, "ICH_WEBHOOK_SECRET": SECRET,
            "ICH_STUDY_QUIET_S": "1.5", "ICH_BATCH_MAX": "16", "ICH_BATCH_WINDOW_MS": "200",
            "ICH_WEBHOOK_MAX_ATTEMPTS": "3", "ICH_WEBHOOK_BACKOFF_S": "0.2",
            "ICH_WORKER_METRICS_PORT": str(self.score_metrics),
            "ICH_ALERTS_METRICS_PORT": str(self.alert_metrics),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **env_overrides,
        }
        self.env = env
        celery = ["-m", "celery", "-A", "worker", "worker", "--without-mingle", "--without-gossip"]
        self.scoring = ServiceProcess(celery + ["-Q", keys.SCORE_QUEUE, "-P", "solo", "-n", "score@%h"],
                                      env, tmp / "worker-score.log")
        self.alerts = ServiceProcess(celery + ["-Q", keys.ALERTS_QUEUE, "-P", "threads", "-c", "4",
                                               "--prefetch-multiplier", "1", "-n", "alerts@%h"],
                                     env, tmp / "worker-alerts.log")

    def start(self) -> "Pipeline":
        self.scoring.start(wait_port=self.score_metrics, timeout=120)
        self.alerts.start(wait_port=self.alert_metrics, timeout=120)
        return self

    def stop(self) -> None:
        self.scoring.stop()
        self.alerts.stop()

    def send(self, data: bytes, meta: SliceMeta) -> SliceMeta:
        self.queue.enqueue(data, meta)
        return meta

    def send_study(self, n: int, positive_at: set[int] = frozenset(), study: str | None = None,
                   corrupt_at: set[int] = frozenset()) -> str:
        """Queue `n` slices of a new study exactly as the listener would; returns its UID."""
        study = study or generate_uid()
        series = generate_uid()
        for i in range(n):
            ds = ct_dataset(lesion_hu(64, seed=i, bleed=i in positive_at))
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, i + 1
            ds.PatientName, ds.PatientID = "PHANTOM^LEAKCHECK", "PID31415926"
            data = b"not a dicom file" if i in corrupt_at else to_bytes(ds)
            self.send(data, SliceMeta(study, series, ds.SOPInstanceUID, instance_number=i + 1,
                                      accession_number="ACC777", calling_ae="TESTSCU"))
        return study

    def results(self, study: str) -> dict[str, dict]:
        raw = self.client.hgetall(keys.study_results(study))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def wait_scored(self, study: str, n: int, timeout: float = 90) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while len(results := self.results(study)) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(results)}/{n} slices of {study} scored\n{self.scoring.log()[-3000:]}")
            time.sleep(0.1)
        return results

    def alerts_for(self, study: str, kind: str | None = None) -> list[dict]:
        return [a for a in self.receiver.accepted()
                if a["study_instance_uid"] == study and (kind is None or a["kind"] == kind)]

    def metrics(self, which: str = "score") -> dict[str, float]:
        return metrics_text(self.score_metrics if which == "score" else self.alert_metrics)

    def wait_metric(self, name: str, at_least: float, timeout: float = 10) -> dict[str, float]:
        """The worker counts a batch just after recording its results, so a scrape can fall
        between the two on a loaded machine: wait for the count, then return every metric."""
        deadline = time.monotonic() + timeout
        while (m := self.metrics()).get(name, 0) < at_least and time.monotonic() < deadline:
            time.sleep(0.1)
        return m
