"""Webhook signatures (DESIGN §7): HMAC-SHA256 over "<timestamp>.<body>", a recent timestamp,
and an alerts process that will not send unsigned alerts by accident."""
from __future__ import annotations

import time

import pytest

from tests.services import ServiceProcess, free_port, wait_for_port
from worker.alerts import TOLERANCE_S, encode, signature, verify

SECRET = "s3cret"


def test_a_signature_binds_the_body_and_a_recent_timestamp():
    body = encode({"alert_id": "a", "kind": "first_positive"})
    now = time.time()
    ts = str(int(now))
    sig = signature(body, SECRET, ts)
    assert verify(body, sig, SECRET, ts, now=now)
    assert not verify(body + b" ", sig, SECRET, ts, now=now)               # body altered
    assert not verify(body, sig, "other", ts, now=now)                      # wrong key
    assert not verify(body, sig, SECRET, str(int(now) + 1), now=now)         # timestamp swapped
    # A captured request replayed later: the signature is still right, the timestamp is not.
    assert not verify(body, sig, SECRET, ts, now=now + TOLERANCE_S + 1)
    assert not verify(body, sig, SECRET, "", now=now) and not verify(body, sig, SECRET, "x", now=now)


@pytest.mark.parametrize("allow", ["", "1"])
def test_the_alerts_process_refuses_to_send_unsigned_alerts_unless_told(redis_server, tmp_path, allow):
    metrics = free_port()
    env = {"ICH_REDIS_URL": redis_server.url, "ICH_WEBHOOK_URLS": "http://127.0.0.1:9/hook",
           "ICH_WEBHOOK_SECRET": "", "ICH_ALERTS_METRICS_PORT": str(metrics),
           "ICH_WEBHOOK_ALLOW_UNSIGNED": allow}
    proc = ServiceProcess(["-m", "celery", "-A", "worker", "worker", "-Q", "alerts", "-P", "threads",
                           "-c", "2", "-n", f"alerts-{allow or 'no'}@%h", "--without-mingle",
                           "--without-gossip"], env, tmp_path / "alerts.log").start()
    try:
        if allow:
            wait_for_port(metrics, timeout=60)
            assert proc.proc.poll() is None and "UNSIGNED" in proc.log()
        else:
            assert proc.proc.wait(60) == 78
            assert "ICH_WEBHOOK_SECRET is empty" in proc.log()
    finally:
        proc.stop()
