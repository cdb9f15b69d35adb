"""Celery tasks: batch scoring, webhook delivery, and the study-summary sweeper.

celery-batches trap (DESIGN §4): the whole batch is acknowledged when `score` returns and also
when it raises, so nothing may escape it unhandled. A batch whose forward pass fails is re-sent
with the same task ids (bounded attempts) before returning; a slice that cannot be decoded is
recorded as failed on its own. What the broker loses all the same (a kill in kombu's BRPOP
window, a re-send Redis refused) stays in the slice ledger, and the alerts process's
reconciler (`worker.reconcile`) re-queues it.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict

import requests
from celery import signals
from celery_batches import Batches
from prometheus_client import start_http_server
from redis.exceptions import LockError, RedisError

from ich import keys
from ich.decision import StudyRule
from ich.metrics import watch
from ich.queue import DELIVER_TASK, RESULT_TASK, SCORE_TASK, connect, task_message
from ich.settings import SettingsError
from worker import alerts, metrics
from worker.celery import app, consumed_queues, settings
from worker.liveness import Liveness
from worker.reconcile import Reconciler
from worker.scoring import Scorer, meta_from_kwargs
from worker.study import FIRST_POSITIVE, STUDY_SUMMARY, SliceResult, StudyStore

log = logging.getLogger("worker")
#: Dead letters kept (newest first); older ones are trimmed (issue 14 item 11).
MAX_DEAD_LETTERS = 10_000
MAX_SCORE_ATTEMPTS = 3
#: A DICOM result send holds its study-and-destination lock at most RESULT_LOCK_S; another
#: send waits RESULT_LOCK_WAIT_S for it, then is retried with the usual backoff.
RESULT_LOCK_S, RESULT_LOCK_WAIT_S = 120, 60
SWEEP_INTERVAL_S = 0.5
#: Past the visibility timeout, how long kombu gets to restore a message before the ledger's
#: reconciler looks for it (kombu sweeps every few seconds; see worker.celery).
RECONCILE_MARGIN_S = 10

redis_client = connect(settings.redis_url)
studies = StudyStore(redis_client, settings.result_ttl_s)
_scorer: Scorer | None = None
_scorer_lock = threading.Lock()
#: Set at start-up where ICH_WORKER_ALIVE_FILE is (worker.liveness).
_liveness: Liveness | None = None


def scorer() -> Scorer:
    """The model, loaded once per process, on first use or at worker start-up."""
    global _scorer
    with _scorer_lock:
        if _scorer is None:
            _scorer = Scorer(settings, redis_client)
        return _scorer


@app.task(base=Batches, name=SCORE_TASK, queue=keys.SCORE_QUEUE, acks_late=True,
          flush_every=settings.batch_max, flush_interval=settings.batch_window_ms / 1000)
def score(requests_: list) -> None:
    if _liveness is not None:
        _liveness.consumed()      # a batch reached us, whatever its fate
    try:
        touched = scorer().score([meta_from_kwargs(r.kwargs) for r in requests_])
    except Exception:
        log.exception("batch of %d failed; re-sending it", len(requests_))
        _resend(requests_)
        return
    for study_uid in touched:   # recorded: from here on, a failure must not re-send the batch
        try:
            alert = scorer().due_alert(study_uid)
            if alert is not None:
                raise_alert(alert)
        except Exception:  # e.g. Redis gone: the study's summary still carries the verdict
            log.exception("study rule check of study %s failed; its summary will decide", study_uid)


def _resend(requests_: list) -> None:
    """Put an unscored batch back (same task ids) unless it has failed too often; the slice
    bytes stay in Redis until scored, so nothing is lost by a transient failure. A slice that
    has failed MAX_SCORE_ATTEMPTS times is recorded as failed (`inference_error`), never
    silently dropped: its study's summary then says it is incomplete (issue 14 item 1)."""
    exhausted = []
    for r in requests_:
        attempt = int((r.request_dict or {}).get("retries") or 0) + 1
        if attempt >= MAX_SCORE_ATTEMPTS:
            exhausted.append(meta_from_kwargs(r.kwargs))
            continue
        try:
            app.send_task(SCORE_TASK, kwargs=r.kwargs, task_id=r.id, queue=keys.SCORE_QUEUE,
                          retries=attempt, countdown=attempt)
        except Exception:  # Redis full or gone: the ledger still holds it (issue 14 item 2)
            log.exception("could not re-send slice %s; the reconciler will re-queue it", r.id)
    if not exhausted:
        return
    try:
        studies.record([SliceResult(m, error="inference_error", scored_at=time.time())
                        for m in exhausted], _rule_for_failures(), _version_for_failures())
    except Exception:  # as above: unrecorded, so still in the ledger
        log.exception("could not record %d failed slice(s); the reconciler will re-queue them",
                      len(exhausted))
        return
    metrics.slices_failed.labels("inference_error").inc(len(exhausted))
    for m in exhausted:
        log.error("slice %s of study %s failed after %d attempts: recorded as inference_error",
                  m.sop_instance_uid, m.study_instance_uid, MAX_SCORE_ATTEMPTS)


def _rule_for_failures() -> StudyRule:
    """The model's rule if it loaded; else the defaults (only used where a study has no
    state yet: a failure never overwrites the rule its scored slices were decided with)."""
    return _scorer.rule if _scorer is not None else StudyRule.from_card(None, settings.thresholds())


def _version_for_failures() -> str:
    return _scorer.version if _scorer is not None else "unavailable"


def raise_alert(alert: dict, quiet_before: float | None = None) -> bool:
    """Publish an alert to every consumer exactly once; log it (without patient data)."""
    messages = [task_message(DELIVER_TASK, keys.ALERTS_QUEUE, str(uuid.uuid4()), args=(alert, url))
                for url in settings.webhook_urls]
    messages += [task_message(RESULT_TASK, keys.ALERTS_QUEUE, str(uuid.uuid4()), args=(alert, dest))
                 for dest in settings.result_destinations]
    if not studies.publish_once(alert, messages, quiet_before=quiet_before):
        return False
    metrics.alerts.labels(alert["kind"]).inc()
    positive = [label for label, p in alert["positive"].items() if p]
    log.info("ALERT %s study %s (accession %s): positive %s, %d slices scored, %d consumer(s)",
             alert["kind"], alert["study_instance_uid"], alert["accession_number"] or "-",
             ",".join(positive) or "none", alert["slices_scored"], len(messages))
    return True


_session = requests.Session()


@app.task(name=DELIVER_TASK, queue=keys.ALERTS_QUEUE, bind=True, acks_late=True,
          max_retries=settings.webhook_max_attempts - 1)
def deliver_alert(self, alert: dict, url: str) -> None:
    """POST the alert to one consumer. kombu acks after this returns: a Redis crash or restart
    between the consumer's 2xx and the ack redelivers the message, so an accepted delivery is
    recorded first and a redelivered copy is dropped ("duplicate"). Only a kill between the
    2xx and that record can still repeat a POST; consumers drop it by Idempotency-Key."""
    index = _consumer_index(url)
    delivered_key = keys.alert_delivered(alert["alert_id"], index)
    try:
        already = redis_client.exists(delivered_key)
    except RedisError:   # cannot tell: deliver (at least once), never drop
        already = False
    if already:
        metrics.deliveries.labels("duplicate").inc()
        log.info("alert %s to consumer %d: already delivered; redelivered copy dropped",
                 alert["alert_id"], index)
        return
    outcome = alerts.post(_session, url, alert, settings.webhook_secret)
    if outcome.delivered:
        metrics.deliveries.labels("delivered").inc()
        if alert["kind"] == FIRST_POSITIVE:
            metrics.time_to_alert.observe(time.time() - alert["received_at"])
        try:
            redis_client.set(delivered_key, 1, ex=settings.result_ttl_s)
        except RedisError:   # delivered all the same; only a redelivery could repeat it
            log.warning("alert %s to consumer %d: delivered, not recorded (Redis unavailable)",
                        alert["alert_id"], index)
        return
    _retry_or_dead_letter(self, alert, metrics.deliveries, "consumer", "url_index",
                          index, outcome.detail, outcome.retry, outcome.retry_after)


def _retry_or_dead_letter(task, alert: dict, counter, what: str, field: str, index: int,
                          detail: str, retry: bool = True, retry_after: float | None = None) -> None:
    """One failed delivery (webhook or DICOM result): retry with backoff while attempts are
    left, else keep it in the dead letters under the target's position in its setting."""
    attempt = task.request.retries + 1
    if retry and attempt < settings.webhook_max_attempts:
        counter.labels("retry").inc()
        delay = retry_after or alerts.backoff(task.request.retries, settings.webhook_backoff_s)
        log.warning("alert %s to %s %d: %s, retry %d in %.1f s", alert["alert_id"], what, index,
                    detail, attempt, delay)
        raise task.retry(countdown=delay)
    counter.labels("dead_letter").inc()
    log.error("alert %s to %s %d dead-lettered after %d attempt(s): %s", alert["alert_id"], what,
              index, attempt, detail)
    dead_letter({"alert": alert, field: index, "attempts": attempt, "last_error": detail,
                 "dead_at": time.time()})


@app.task(name=RESULT_TASK, queue=keys.ALERTS_QUEUE, bind=True, acks_late=True,
          max_retries=settings.webhook_max_attempts - 1)
def deliver_result(self, alert: dict, destination: str) -> None:
    """The alert as DICOM (an SR and, when positive, a key image; worker.pacs) to one PACS.
    Same retry, backoff and dead-letter rules as a webhook. A summary that says what this
    destination was last sent is not sent again; one that says more supersedes it."""
    from worker import pacs   # highdicom: only the alerts process needs it

    index = _destination_index(destination)
    sent_key = keys.results_sent(alert["study_instance_uid"], alert["model_version"])
    # One send at a time per study and destination: the summary must see what the
    # first_positive stored (to supersede it), whichever retry brings them back together.
    try:
        with redis_client.lock(f"{sent_key}:lock:{index}", timeout=RESULT_LOCK_S,
                               blocking_timeout=RESULT_LOCK_WAIT_S):
            _deliver_result(self, pacs, alert, destination, index, sent_key)
    except LockError as exc:
        # Another send to this destination held the lock too long (a PACS that accepts the
        # association and then hangs), or it expired under us. The result is not lost: it is
        # retried like a refused store, and a retry of something already sent is "unchanged".
        _retry_or_dead_letter(self, alert, metrics.results, "destination", "destination", index,
                              f"result lock: {exc}")


def _deliver_result(self, pacs, alert: dict, destination: str, index: int, sent_key: str) -> None:
    raw = redis_client.hget(sent_key, destination)
    previous = pacs.Sent(**json.loads(raw)) if raw else None
    digest = pacs.digest(alert)
    if previous is not None and (previous.digest == digest or previous.kind == STUDY_SUMMARY):
        # Nothing new, or a first_positive retried after the summary was stored: stale.
        metrics.results.labels("unchanged").inc()
        return
    try:
        datasets = pacs.build(alert, studies.evidence(alert["study_instance_uid"]), previous)
    except KeyError:   # nothing kept for this study (scored before ICH_RESULT_DESTINATIONS)
        metrics.results.labels("no_evidence").inc()
        log.warning("alert %s: no header kept for its study; no DICOM result for destination %d",
                    alert["alert_id"], index)
        return
    except Exception as exc:  # noqa: BLE001 — a header no SR can be built from: it never will be
        _retry_or_dead_letter(self, alert, metrics.results, "destination", "destination", index,
                              f"cannot build the result: {type(exc).__name__}", retry=False)
        return
    try:
        tls = (pacs.tls_context(settings.result_tls_ca, settings.tls_cert, settings.tls_key)
               if settings.result_tls_ca else None)
        stored, detail = pacs.store(datasets, destination, settings.ae_title, tls=tls)
    except Exception as exc:  # network errors and the like: retried as a refused store
        stored, detail = False, type(exc).__name__
    if stored:
        sr = datasets[0]
        pipe = redis_client.pipeline(transaction=True)
        pipe.hset(sent_key, destination, json.dumps(asdict(
            pacs.Sent(digest, alert["kind"], sr.SOPInstanceUID, sr.SeriesInstanceUID))))
        pipe.expire(sent_key, settings.result_ttl_s)
        pipe.execute()
        metrics.results.labels("stored").inc()
        log.info("alert %s: %d DICOM object(s) stored at destination %d", alert["alert_id"],
                 len(datasets), index)
        return
    _retry_or_dead_letter(self, alert, metrics.results, "destination", "destination", index, detail)


def _destination_index(destination: str) -> int:
    """Destinations are named by position in ICH_RESULT_DESTINATIONS in logs."""
    dests = settings.result_destinations
    return dests.index(destination) if destination in dests else -1


def dead_letter(record: dict) -> None:
    """Keep an undeliverable alert for `python -m worker.deadletters` (newest first, bounded)."""
    pipe = redis_client.pipeline(transaction=True)
    pipe.lpush(keys.DEAD_LETTERS, alerts.encode(record))
    pipe.ltrim(keys.DEAD_LETTERS, 0, MAX_DEAD_LETTERS - 1)
    pipe.execute()


def _consumer_index(url: str) -> int:
    """Consumers are named by position in ICH_WEBHOOK_URLS: URLs may carry tokens."""
    return settings.webhook_urls.index(url) if url in settings.webhook_urls else -1


def sweep_once(now: float | None = None) -> int:
    """Send the summary of every study quiet for ICH_STUDY_QUIET_S; returns how many."""
    now = now or time.time()
    sent = 0
    for study_uid in studies.quiet_studies(settings.study_quiet_s, now):
        try:
            if not redis_client.exists(keys.study_state(study_uid)):
                # Its state expired (ICH_RESULT_TTL_S) or was deleted: nothing left to summarise,
                # and keeping it would grow ACTIVE_STUDIES without bound (issue 14 item 11).
                redis_client.zrem(keys.ACTIVE_STUDIES, study_uid)
                log.warning("study %s has no state left; dropped from the summary queue", study_uid)
                continue
            alert = studies.build_alert(STUDY_SUMMARY, study_uid)
            sent += raise_alert(alert, quiet_before=now - settings.study_quiet_s)
        except Exception:  # one broken study (state expired, unknown rule) must not stop the rest
            log.exception("summary of study %s failed; retried next sweep", study_uid)
    return sent


def reconcile_once(reconciler: Reconciler) -> int:
    """Re-queue the slices the broker lost (`worker.reconcile`); returns how many."""
    requeued = reconciler.sweep()
    metrics.slices_requeued.inc(len(requeued))
    return len(requeued)


def _sweep_forever(stop: threading.Event) -> None:
    """Summaries every SWEEP_INTERVAL_S; the ledger every few seconds. A token is looked at once
    it is older than the visibility timeout (kombu's own redelivery) plus a margin."""
    reconciler = Reconciler(redis_client, settings.visibility_timeout_s + RECONCILE_MARGIN_S)
    every = max(1.0, min(10.0, settings.visibility_timeout_s / 4))
    next_reconcile = time.monotonic() + every
    while not stop.wait(SWEEP_INTERVAL_S):
        try:
            sweep_once()
            if time.monotonic() >= next_reconcile:
                next_reconcile = time.monotonic() + every
                reconcile_once(reconciler)
        except Exception:  # Redis down: keep the thread, try again next tick
            log.exception("summary or ledger sweep failed")


_stop_sweeper = threading.Event()


@signals.worker_ready.connect
def _on_ready(sender=None, **_) -> None:
    """Start what this worker's queues need: metrics, the model, liveness, the summary sweeper."""
    global _liveness
    queues = consumed_queues()
    scoring, delivering = keys.SCORE_QUEUE in queues, keys.ALERTS_QUEUE in queues
    port = settings.worker_metrics_port if scoring else settings.alerts_metrics_port
    if port:
        start_http_server(port)
        log.info("metrics on :%d/metrics", port)
    watch(metrics.queue_depth, lambda: redis_client.llen(keys.SCORE_QUEUE))
    watch(metrics.slices_pending, lambda: redis_client.zcard(keys.LEDGER))
    if scoring:
        scorer()
        if settings.worker_alive_file:
            _liveness = Liveness(redis_client, keys.SCORE_QUEUE, settings.worker_alive_file,
                                 settings.worker_stall_s)
            threading.Thread(target=_liveness.run, name="liveness", daemon=True,
                             args=(_stop_sweeper, min(5.0, settings.worker_stall_s / 4))).start()
    if delivering and settings.result_destinations and settings.result_tls_ca:
        try:   # results over TLS: the CA and our client certificate must be here, not found later
            settings.require_files("result_tls_ca", "tls_cert", "tls_key")
        except SettingsError as exc:
            log.critical("%s. Exiting.", exc)
            logging.shutdown()
            os._exit(78)
    if delivering and settings.webhook_urls and not settings.webhook_secret:
        if not settings.webhook_allow_unsigned:
            log.critical("ICH_WEBHOOK_URLS is set but ICH_WEBHOOK_SECRET is empty: consumers could "
                         "not tell our alerts from forged ones. Set a secret, or "
                         "ICH_WEBHOOK_ALLOW_UNSIGNED=1 to send unsigned alerts anyway. Exiting.")
            logging.shutdown()
            os._exit(78)   # EX_CONFIG: a Celery signal handler's exception would be swallowed
        log.warning("sending UNSIGNED alerts (ICH_WEBHOOK_ALLOW_UNSIGNED)")
    if delivering:
        threading.Thread(target=_sweep_forever, args=(_stop_sweeper,), name="summary-sweeper",
                         daemon=True).start()


@signals.worker_shutting_down.connect
def _on_shutdown(**_) -> None:
    _stop_sweeper.set()
