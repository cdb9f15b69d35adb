"""The reference webhook consumer (`python -m worker.receiver`), as integrators will copy it:
it takes a fresh signed alert, refuses a stale or unsigned one, and bounds the body length the
peer declares before reading it."""
from __future__ import annotations

import http.client
import time

from tests.services import ServiceProcess, free_port
from worker.alerts import encode, signature

SECRET = "receiver-secret"
ALERT = {"alert_id": "r1", "kind": "first_positive", "study_instance_uid": "1.2.3",
         "accession_number": "", "positive": {"any": True}, "probabilities": {"any": 0.9},
         "thresholds": {"any": 0.5}, "slices_scored": 3, "latency_seconds": 0.1}


def post(port: int, body: bytes, headers: dict) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/alerts", body=body, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def test_reference_receiver_verifies_and_bounds(tmp_path):
    port = free_port()
    proc = ServiceProcess(["-m", "worker.receiver", "--port", str(port), "--secret", SECRET], {},
                          tmp_path / "receiver.log").start(wait_port=port)
    try:
        body = encode(ALERT)
        now = str(int(time.time()))
        assert post(port, body, {"X-ICH-Timestamp": now, "X-ICH-Signature": signature(body, SECRET, now),
                                 "Idempotency-Key": "r1"}) == 204
        stale = str(int(time.time()) - 3600)
        assert post(port, body, {"X-ICH-Timestamp": stale,
                                 "X-ICH-Signature": signature(body, SECRET, stale)}) == 401
        assert post(port, body, {}) == 401
        # A peer declaring 4 GiB gets 413 at once, without the receiver reading (or allocating) it.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("POST", "/alerts")
        conn.putheader("Content-Length", str(4 << 30))
        conn.endheaders()
        assert conn.getresponse().status == 413
        conn.close()
        assert "FIRST_POSITIVE study 1.2.3" in proc.log()
    finally:
        proc.stop()
