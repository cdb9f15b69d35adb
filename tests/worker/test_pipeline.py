"""Scoring and alerting end to end inside the worker room: real Celery workers, Redis, consumer."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from ich import keys
from tests.pipeline import SECRET
from worker.alerts import encode, verify


def test_burst_is_scored_in_real_batches(pipeline):
    before = pipeline.metrics()
    # Hold the worker back until the whole burst is queued, so batches can fill.
    study = pipeline.send_study(48)
    results = pipeline.wait_scored(study, 48)
    assert all("probabilities" in r for r in results.values())
    after = pipeline.wait_metric("ich_slices_scored_total", before.get("ich_slices_scored_total", 0) + 48)
    scored = after["ich_slices_scored_total"] - before.get("ich_slices_scored_total", 0)
    batches = after["ich_batch_size_count"] - before.get("ich_batch_size_count", 0)
    assert scored == 48
    assert scored / batches > 2, f"{batches} batches for {scored} slices: not batching"
    assert after['ich_model_info{version="test-detector-1"}'] == 1
    assert after["ich_end_to_end_seconds_count"] >= 48


def test_positive_study_one_signed_first_positive_then_a_summary(pipeline):
    study = pipeline.send_study(12, positive_at={5, 6, 7})
    pipeline.wait_scored(study, 12)
    pipeline.receiver.wait_for(lambda: pipeline.alerts_for(study, "study_summary"), timeout=60)
    first = pipeline.alerts_for(study, "first_positive")
    assert len(first) == 1
    alert = first[0]
    assert alert["positive"]["any"] and alert["probabilities"]["any"] > 0.9
    assert alert["thresholds"]["any"] == 0.15 and alert["model_version"] == "test-detector-1"
    assert {s["instance_number"] for s in alert["positive_slices"]} <= {6, 7, 8}
    assert alert["accession_number"] == "ACC777" and alert["calling_ae"] == "TESTSCU"
    assert alert["latency_seconds"] >= 0 and alert["alerted_at"] >= alert["received_at"]
    request = next(r for r in pipeline.receiver.requests if json.loads(r["body"]) == alert)
    assert verify(request["body"], request["headers"]["X-ICH-Signature"], SECRET,
                  request["headers"]["X-ICH-Timestamp"])
    assert not verify(request["body"], request["headers"]["X-ICH-Signature"], "wrong-secret",
                      request["headers"]["X-ICH-Timestamp"])
    assert request["headers"]["Idempotency-Key"] == alert["alert_id"]
    assert request["body"] == encode(alert)
    summary = pipeline.alerts_for(study, "study_summary")
    assert len(summary) == 1 and summary[0]["positive"]["any"]
    assert summary[0]["slices_scored"] == 12
    assert {s["instance_number"] for s in summary[0]["positive_slices"]} == {6, 7, 8}
    for r in pipeline.receiver.requests:
        assert b"LEAKCHECK" not in r["body"] and b"31415926" not in r["body"]


def test_negative_study_gets_a_negative_summary_and_no_first_positive(pipeline):
    study = pipeline.send_study(8)
    pipeline.wait_scored(study, 8)
    pipeline.receiver.wait_for(lambda: pipeline.alerts_for(study, "study_summary"), timeout=60)
    summary = pipeline.alerts_for(study, "study_summary")[0]
    assert not any(summary["positive"].values()) and summary["positive_slices"] == []
    assert summary["probabilities"]["any"] < 0.15
    assert pipeline.alerts_for(study, "first_positive") == []


def test_consumer_failing_twice_gets_the_alert_once_with_one_key(pipeline):
    study = "1.2.826.0.1.3680043.8.498.777001"
    pipeline.receiver.script[study] = [500, 503]
    pipeline.send_study(4, positive_at={1}, study=study)
    pipeline.receiver.wait_for(lambda: pipeline.alerts_for(study, "first_positive"), timeout=60)
    attempts = [r for r in pipeline.receiver.requests
                if json.loads(r["body"])["study_instance_uid"] == study
                and json.loads(r["body"])["kind"] == "first_positive"]
    assert [r["status"] for r in attempts] == [500, 503, 200]
    assert len({r["headers"]["Idempotency-Key"] for r in attempts}) == 1
    assert len(pipeline.alerts_for(study, "first_positive")) == 1


def test_consumer_that_never_recovers_ends_in_the_dead_letter_list(pipeline):
    study = "1.2.826.0.1.3680043.8.498.777002"
    pipeline.receiver.script[study] = [500] * 100
    pipeline.send_study(3, positive_at={0}, study=study)

    def dead() -> list[dict]:
        records = [json.loads(r) for r in pipeline.client.lrange(keys.DEAD_LETTERS, 0, -1)]
        return [r for r in records if r["alert"]["study_instance_uid"] == study
                and r["alert"]["kind"] == "first_positive"]

    pipeline.receiver.wait_for(dead, timeout=60)
    record = dead()[0]
    assert record["attempts"] == 3 and record["last_error"] == "500" and record["url_index"] == 0
    assert pipeline.metrics("alerts")['ich_webhook_deliveries_total{outcome="dead_letter"}'] >= 1


def test_undecodable_slice_fails_alone(pipeline):
    before = pipeline.metrics().get('ich_slices_failed_total{reason="undecodable"}', 0)
    study = pipeline.send_study(6, positive_at={4}, corrupt_at={2})
    results = pipeline.wait_scored(study, 6)
    errors = [r for r in results.values() if "error" in r]
    assert [(r["instance_number"], r["error"]) for r in errors] == [(3, "undecodable")]
    assert sum("probabilities" in r for r in results.values()) == 5
    failed = 'ich_slices_failed_total{reason="undecodable"}'
    assert pipeline.wait_metric(failed, before + 1)[failed] == before + 1
    pipeline.receiver.wait_for(lambda: pipeline.alerts_for(study, "first_positive"), timeout=60)


def test_resending_the_same_study_does_not_alert_again(pipeline):
    study = pipeline.send_study(3, positive_at={1})
    pipeline.wait_scored(study, 3)
    pipeline.receiver.wait_for(lambda: pipeline.alerts_for(study, "first_positive"), timeout=60)
    assert pipeline.client.keys(keys.slice_bytes("*")) == []  # bytes dropped once scored
    # The PACS resends the study (same UIDs, new receipts): scored again, never re-alerted.
    pipeline.send_study(3, positive_at={1}, study=study)
    pipeline.wait_scored(study, 6, timeout=60)  # new SOP UIDs: the resend made new instances
    time.sleep(1.0)
    assert len(pipeline.alerts_for(study, "first_positive")) == 1


def test_results_cli_shows_a_study(pipeline):
    study = pipeline.send_study(2)
    pipeline.wait_scored(study, 2)
    out = subprocess.run([sys.executable, "-m", "worker.results", study, "--redis-url",
                          pipeline.redis.url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert len(shown["slices"]) == 2 and shown["state"]["model_version"] == "test-detector-1"
    missing = subprocess.run([sys.executable, "-m", "worker.results", "1.2.3.4", "--redis-url",
                              pipeline.redis.url], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no results" in missing.stderr


def test_worker_logs_hold_no_patient_data(pipeline):
    for log in (pipeline.scoring.log(), pipeline.alerts.log()):
        assert "LEAKCHECK" not in log and "31415926" not in log
    assert "ALERT first_positive" in pipeline.scoring.log()
    assert "ALERT study_summary" in pipeline.alerts.log()
    assert "test-webhook-secret" not in pipeline.scoring.log() + pipeline.alerts.log()
