"""Every Redis key and Celery queue name, defined once (the arq/rq habit).

Listener, worker, alerts and tests import these; nobody spells a key by hand. All keys live
under one prefix so a shared Redis can be inspected (`SCAN MATCH ich:*`) and cleaned safely.
"""
from __future__ import annotations

PREFIX = "ich"

#: Celery queue of score requests (one message per received CT slice).
SCORE_QUEUE = "ich.score"
#: Celery queue of webhook deliveries: separate so a slow consumer never slows scoring.
ALERTS_QUEUE = "alerts"

#: Alerts whose last delivery attempt failed (a Redis list of JSON records).
DEAD_LETTERS = f"{PREFIX}:alerts:dead"
#: The slice ledger (issue 14): every accepted slice's receipt token, scored by the Redis time it
#: was (re-)queued. Written in the listener's enqueue transaction, removed only in the transaction
#: that records the slice's result; the reconciler re-queues tokens the broker has lost.
LEDGER = f"{PREFIX}:ledger"
#: The score message of each ledger token (a hash), so the reconciler can re-queue it as sent.
LEDGER_MESSAGES = f"{PREFIX}:ledger:messages"
#: kombu's Redis transport keeps delivered, unacknowledged messages in this hash (its
#: `unacked_key`; we set no `global_keyprefix`). The reconciler reads it to see what is in flight.
KOMBU_UNACKED = "unacked"

#: Studies with unsent summaries, scored by the time of their last slice (a sorted set).
ACTIVE_STUDIES = f"{PREFIX}:studies:active"


def slice_bytes(token: str) -> str:
    """The received DICOM bytes of one instance, keyed by a per-receipt token (not the SOP
    Instance UID: a resent instance with the same UID but new content must not overwrite)."""
    return f"{PREFIX}:slice:{token}"


def study_state(study_uid: str) -> str:
    """Hash of one study's running state: slices scored, max probability per label, times."""
    return f"{PREFIX}:study:{study_uid}"


def study_results(study_uid: str) -> str:
    """Hash of per-slice results of one study, by SOP Instance UID."""
    return f"{PREFIX}:study:{study_uid}:slices"


def alert_sent(study_uid: str, model_version: str, kind: str) -> str:
    """Idempotency marker: one alert per (study, model version, kind) (DESIGN §4)."""
    return f"{PREFIX}:alert:{study_uid}:{model_version}:{kind}"


def alert_delivered(alert_id: str, consumer_index: int) -> str:
    """Set once a consumer accepted the alert (2xx): a copy of the delivery message that kombu
    redelivers because its ack was lost is then not POSTed again."""
    return f"{PREFIX}:alert:{alert_id}:delivered:{consumer_index}"


def study_evidence(study_uid: str) -> str:
    """Hash of what the DICOM results of a study are built from (issue 15): `header` (a
    received slice without pixels: the patient and study modules) and the `key_*` fields of its
    most suspicious slice so far (brain-window pixels, UIDs, frame, `any` probability). Holds
    patient data like the slice bytes do; expires with the study."""
    return f"{PREFIX}:study:{study_uid}:evidence"


def results_sent(study_uid: str, model_version: str) -> str:
    """Hash, per result destination, of the last SR sent for the study: what it said and its
    UIDs, so an unchanged summary is not re-sent and a changed one supersedes it."""
    return f"{PREFIX}:results:{study_uid}:{model_version}"
