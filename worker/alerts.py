"""Webhook delivery: sign, POST, classify the answer, back off, dead-letter (DESIGN §1, §3).

One Celery task per (alert, consumer URL), so consumers fail independently. The body is the
alert JSON exactly as signed. Each attempt carries `X-ICH-Timestamp: <unix seconds>` and
`X-ICH-Signature: sha256=<hex>`, HMAC-SHA256 with ICH_WEBHOOK_SECRET of "<timestamp>.<body>"
(Stripe's scheme): a consumer that checks the timestamp is recent cannot be fed a replay of an
old request. `Idempotency-Key` is the alert id, stable across retries and redeliveries, so a
consumer can drop a duplicate.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import requests

CONNECT_TIMEOUT_S = 3.05
READ_TIMEOUT_S = 10.0
#: Retry countdowns stay below the Redis visibility timeout (60 s by default): Celery holds a
#: countdown task unacknowledged, and one held longer would be redelivered (DESIGN §4).
MAX_BACKOFF_S = 30.0
USER_AGENT = "ICH-Watch-webhook/1"


def encode(alert: dict) -> bytes:
    """Canonical body bytes: the exact bytes that are signed and sent."""
    return json.dumps(alert, sort_keys=True, separators=(",", ":")).encode()


#: How far a consumer lets `X-ICH-Timestamp` stray from its clock before refusing a request.
TOLERANCE_S = 300


def signature(body: bytes, secret: str, timestamp: str) -> str:
    signed = timestamp.encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def verify(body: bytes, header: str, secret: str, timestamp: str,
           tolerance_s: float = TOLERANCE_S, now: float | None = None) -> bool:
    """What a consumer does (and what our tests do): the timestamp is recent, and the
    signature over "<timestamp>.<body>" matches (constant-time compare)."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except (TypeError, ValueError):
        return False
    return age <= tolerance_s and hmac.compare_digest(signature(body, secret, timestamp), header or "")


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    retry: bool          # worth another attempt (network error, 5xx, 429)
    detail: str          # safe for logs: status code or exception type
    retry_after: float | None = None


def post(session: requests.Session, url: str, alert: dict, secret: str) -> Outcome:
    body = encode(alert)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Idempotency-Key": alert["alert_id"],
        "X-ICH-Alert-Kind": alert["kind"],
    }
    if secret:
        timestamp = str(int(time.time()))   # per attempt: a retry is signed afresh
        headers["X-ICH-Timestamp"] = timestamp
        headers["X-ICH-Signature"] = signature(body, secret, timestamp)
    try:
        response = session.post(url, data=body, headers=headers,
                                timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
    except requests.RequestException as exc:
        return Outcome(False, True, type(exc).__name__)
    code = response.status_code
    if 200 <= code < 300:
        return Outcome(True, False, str(code))
    if code == 429 or code >= 500:
        return Outcome(False, True, str(code), _retry_after(response.headers.get("Retry-After")))
    return Outcome(False, False, str(code))  # 4xx: the consumer refuses this alert for good


def backoff(attempt: int, base_s: float) -> float:
    """Exponential with full jitter (AWS architecture blog): spreads a thundering herd."""
    return random.uniform(0.5, 1.0) * min(MAX_BACKOFF_S, base_s * 2 ** attempt)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, min(MAX_BACKOFF_S, seconds))
