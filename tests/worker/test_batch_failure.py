"""The celery-batches trap (DESIGN §4): a batch is acknowledged even when its function fails,
so a failed forward pass must put the batch back itself (same task ids), not drop it."""
from __future__ import annotations

import json
import time
from dataclasses import asdict

import pytest
import redis
from celery_batches import SimpleRequest
from pydicom.uid import generate_uid

from ich import keys
from ich.queue import SliceMeta, SliceQueue
from tests.ctfactory import ct_dataset, lesion_hu, to_bytes
from tests.modelfactory import blood_detector


@pytest.fixture(scope="module")
def tasks(redis_server, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ICH_REDIS_URL", redis_server.url)
        mp.setenv("ICH_MODEL_DIR", str(blood_detector(tmp_path_factory.mktemp("models"))))
        import worker.tasks as tasks
        assert tasks.settings.redis_url == redis_server.url, "worker.celery was imported earlier"
        yield tasks


def requests_for(client, n: int, retries: int = 0) -> list[SimpleRequest]:
    queue = SliceQueue(client, 1000, 600)
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        meta = SliceMeta(study, series, generate_uid(), instance_number=i)
        queue.enqueue(to_bytes(ct_dataset(lesion_hu(64, seed=i))), meta)
        out.append(SimpleRequest(meta.token, "ich.score_slice", (), asdict(meta), {}, "test", True,
                                 None, None, {"retries": retries}))
    client.delete(keys.SCORE_QUEUE)  # the test plays the consumer: these requests are "taken"
    return out


def requeued(client) -> list[dict]:
    return [json.loads(m)["headers"] for m in client.lrange(keys.SCORE_QUEUE, 0, -1)]


def test_failed_forward_pass_resends_the_batch_with_the_same_ids(tasks, redis_server, monkeypatch):
    client = redis.Redis.from_url(redis_server.url)
    batch = requests_for(client, 3)

    def broken(images):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(tasks.scorer(), "predict", broken)
    tasks.score(batch)  # must not raise: celery-batches would ack the batch either way
    headers = requeued(client)
    assert sorted(h["id"] for h in headers) == sorted(r.id for r in batch)
    assert all(h["retries"] == 1 and h["task"] == "ich.score_slice" for h in headers)
    assert all(client.exists(keys.slice_bytes(r.id)) for r in batch)  # bytes kept for the retry
    assert client.hlen(keys.study_results(batch[0].kwargs["study_instance_uid"])) == 0


def test_a_batch_that_keeps_failing_is_recorded_as_failed_never_dropped(tasks, redis_server, monkeypatch):
    """Issue 14 item 1: after MAX_SCORE_ATTEMPTS the slices get a result (`inference_error`),
    their bytes are released, and the study's summary says it is incomplete."""
    from worker import metrics

    client = redis.Redis.from_url(redis_server.url)
    batch = requests_for(client, 2, retries=tasks.MAX_SCORE_ATTEMPTS - 1)
    before = metrics.slices_failed.labels("inference_error")._value.get()
    monkeypatch.setattr(tasks.scorer(), "predict", lambda images: 1 / 0)
    tasks.score(batch)
    assert requeued(client) == []
    assert metrics.slices_failed.labels("inference_error")._value.get() == before + 2
    study = batch[0].kwargs["study_instance_uid"]
    results = tasks.studies.results(study)
    assert [r.get("error") for r in results] == ["inference_error", "inference_error"]
    assert not any(client.exists(keys.slice_bytes(r.id)) for r in batch)
    summary = tasks.studies.build_alert("study_summary", study)
    assert summary["complete"] is False and summary["slices_failed"] == 2
    assert summary["model_version"] == tasks.scorer().version


def test_a_resend_redis_refuses_escapes_nothing_and_the_ledger_requeues_it(tasks, redis_server,
                                                                       monkeypatch):
    """Issue 14 item 2: the forward pass fails and Redis then refuses the re-send (maxmemory):
    `score` must not raise, and the unscored slices stay in the ledger, from which the
    reconciler re-queues them with their own ids once Redis takes writes again."""
    from worker.reconcile import Reconciler

    client = redis.Redis.from_url(redis_server.url)
    client.delete(keys.LEDGER, keys.LEDGER_MESSAGES)   # earlier tests' slices
    batch = requests_for(client, 3)
    monkeypatch.setattr(tasks.scorer(), "predict", lambda images: 1 / 0)
    client.config_set("maxmemory", "1")   # every write is refused: OOM command not allowed
    try:
        tasks.score(batch)
    finally:
        client.config_set("maxmemory", "0")
    assert requeued(client) == []
    reconciler = Reconciler(client, older_than_s=0)
    reconciler.sweep()
    assert sorted(reconciler.sweep()) == sorted(r.id for r in batch)
    assert sorted(h["id"] for h in requeued(client)) == sorted(r.id for r in batch)
    client.delete(keys.SCORE_QUEUE, keys.LEDGER, keys.LEDGER_MESSAGES)


def test_a_batch_redelivered_after_a_kill_still_raises_the_first_positive(tasks, redis_server,
                                                                         monkeypatch):
    """A worker killed after recording a batch but before publishing its study's
    first_positive: kombu redelivers the batch, whose bytes are gone. The recorded results are
    kept (issue 14 item 3), and the redelivered copies must still get the alert out."""
    client = redis.Redis.from_url(redis_server.url)
    batch = requests_for(client, 2)          # blood in both slices: a positive study
    study = batch[0].kwargs["study_instance_uid"]
    with monkeypatch.context() as m:         # the kill: recorded, no alert published
        m.setattr(tasks.scorer(), "due_alert", lambda uid: (_ for _ in ()).throw(SystemError()))
        tasks.score(batch)
    assert not tasks.studies.alerted(study, tasks.scorer().version, "first_positive")
    tasks.score(batch)                       # the redelivery
    assert tasks.studies.alerted(study, tasks.scorer().version, "first_positive")
    assert all("probabilities" in r for r in tasks.studies.results(study))


def test_the_same_batch_scores_once_the_model_works(tasks, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    batch = requests_for(client, 2)
    tasks.score(batch)
    assert client.hlen(keys.study_results(batch[0].kwargs["study_instance_uid"])) == 2
    assert requeued(client) == []


def test_a_failing_study_rule_check_keeps_the_recorded_results(tasks, redis_server, monkeypatch):
    """Once a batch is recorded its bytes are gone: re-sending it would turn every result into
    an `expired` failure. A failure after that (Redis away while the rule is checked) is logged
    per study; the results stay and nothing is re-sent."""
    client = redis.Redis.from_url(redis_server.url)
    batch = requests_for(client, 3)

    def broken(study_uid):
        raise redis.ConnectionError("simulated Redis outage during the rule check")

    monkeypatch.setattr(tasks.scorer(), "due_alert", broken)
    tasks.score(batch)   # must not raise
    assert requeued(client) == []
    results = tasks.studies.results(batch[0].kwargs["study_instance_uid"])
    assert len(results) == 3 and all("probabilities" in r for r in results)


def test_one_broken_study_does_not_stop_the_summaries_of_the_others(tasks, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    good = requests_for(client, 2)
    tasks.score(good)
    good_uid = good[0].kwargs["study_instance_uid"]
    client.zadd(keys.ACTIVE_STUDIES, {"1.2.999.broken": 0})   # its state hash has expired
    assert tasks.sweep_once(now=time.time() + 3600) >= 1   # the broken study is swept first
    assert tasks.studies.alerted(good_uid, tasks.scorer().version, "study_summary")


def test_dead_letters_are_bounded_listed_and_replayed(tasks, redis_server, monkeypatch):
    """Issue 14 item 11: the dead-letter list keeps the newest MAX_DEAD_LETTERS; operators list
    them and queue them again for the consumer they failed on."""
    import subprocess
    import sys

    client = redis.Redis.from_url(redis_server.url)
    client.delete(keys.DEAD_LETTERS, keys.ALERTS_QUEUE)
    monkeypatch.setattr(tasks, "MAX_DEAD_LETTERS", 3)
    for i in range(5):
        tasks.dead_letter({"alert": {"alert_id": f"a{i}", "kind": "first_positive",
                                     "study_instance_uid": f"1.2.{i}"},
                           "url_index": 1 if i == 4 else 0, "attempts": 8,
                           "last_error": "503", "dead_at": 1.0 + i})
    assert client.llen(keys.DEAD_LETTERS) == 3          # a4, a3, a2: the newest
    env = {"ICH_REDIS_URL": redis_server.url, "ICH_WEBHOOK_URLS": "http://127.0.0.1:9/hook",
           "PATH": "/usr/bin:/bin"}

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "worker.deadletters", *argv], env=env,
                              capture_output=True, text=True, timeout=60)

    listed = [json.loads(line) for line in cli("list").stdout.splitlines()]
    assert [d["alert_id"] for d in listed] == ["a4", "a3", "a2"] and listed[0]["consumer"] == 1
    replay = cli("replay", "--all")
    assert replay.returncode == 1 and "consumer 1 is not in ICH_WEBHOOK_URLS" in replay.stderr
    assert "replayed 2" in replay.stdout
    assert [json.loads(raw)["alert"]["alert_id"] for raw in client.lrange(keys.DEAD_LETTERS, 0, -1)] == ["a4"]
    queued = [json.loads(m) for m in client.lrange(keys.ALERTS_QUEUE, 0, -1)]
    assert len(queued) == 2 and all(m["headers"]["task"] == "ich.deliver_alert" for m in queued)
    # A DICOM result that was dead-lettered goes back to its destination (issue 15).
    client.delete(keys.DEAD_LETTERS, keys.ALERTS_QUEUE)
    tasks.dead_letter({"alert": {"alert_id": "r0", "kind": "study_summary", "study_instance_uid": "1.2.9"},
                       "destination": 0, "attempts": 8, "last_error": "statuses 0xA700", "dead_at": 9.0})
    env["ICH_RESULT_DESTINATIONS"] = "PACS@127.0.0.1:104"
    assert json.loads(cli("list").stdout)["destination"] == 0
    assert cli("replay", "r0").returncode == 0
    message = json.loads(client.lrange(keys.ALERTS_QUEUE, 0, -1)[0])
    assert message["headers"]["task"] == "ich.deliver_result" and client.llen(keys.DEAD_LETTERS) == 0


def test_a_study_whose_state_expired_leaves_the_summary_queue(tasks, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.zadd(keys.ACTIVE_STUDIES, {"1.2.999.gone": 0})
    tasks.sweep_once(now=time.time() + 3600)
    assert client.zscore(keys.ACTIVE_STUDIES, "1.2.999.gone") is None


def test_a_result_whose_lock_stays_taken_is_retried_not_dropped(tasks, redis_server, monkeypatch):
    """deliver_result serialises sends per study and destination with a Redis lock. When the
    lock cannot be had in time (a PACS that accepted and hangs holds it), redis-py raises
    LockError; escaping the task, it would end it as failed and acknowledged: a result lost."""
    client = redis.Redis.from_url(redis_server.url)
    alert = {"alert_id": "lock-1", "kind": "study_summary", "study_instance_uid": "1.2.777",
             "model_version": "v1"}
    destination = "PACS@127.0.0.1:104"
    held = client.lock(f"{keys.results_sent('1.2.777', 'v1')}:lock:{tasks._destination_index(destination)}",
                       timeout=30)
    assert held.acquire(blocking=False)
    calls = []
    monkeypatch.setattr(tasks, "RESULT_LOCK_WAIT_S", 0.3)
    monkeypatch.setattr(tasks, "_retry_or_dead_letter", lambda *args, **kw: calls.append(args))
    try:
        tasks.deliver_result(alert, destination)
    finally:
        held.release()
    assert len(calls) == 1 and calls[0][1] == alert and calls[0][-1].startswith("result lock:")


def test_a_changed_result_supersedes_the_sent_one_and_an_unchanged_one_is_not_sent(tasks, redis_server):
    """Issue 15, without timing: a real pynetdicom Storage SCP as the PACS. The first_positive
    stores an SR and a key image; a summary that says the same stores nothing ("unchanged"); a
    summary that says more stores a new SR naming the first in Predecessor Documents
    (PS3.3 C.17.2.3) and a key image again. The slices carry no Patient module (Type 2, a
    sender may strip it): the SR is built with those attributes empty (highdicom raised
    AttributeError before, which ended the task acknowledged and lost the result)."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
    from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

    from ich.decision import StudyRule
    from ich.labels import ANY, DEFAULT_THRESHOLDS, LABELS
    from worker.study import SliceResult
    from tests.services import free_port

    received = []

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    scp = AE(ae_title="PACS")
    for context in AllStoragePresentationContexts:
        scp.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        uid, series = generate_uid(), generate_uid()
        rule = StudyRule("max", 1, {**DEFAULT_THRESHOLDS, ANY: 0.5})

        def score(instance: int, p: float) -> None:
            ds = ct_dataset(lesion_hu(64, seed=instance))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = uid, series
            meta = SliceMeta(uid, series, ds.SOPInstanceUID, instance_number=instance)
            result = SliceResult(meta, dict(zip(LABELS, [p] * 6)))
            tasks.studies.record([result], rule, "v1")
            tasks.studies.keep_evidence(uid, to_bytes(ds), result)

        destination = f"PACS@127.0.0.1:{port}"

        def deliver(kind):
            before = len(received)
            tasks.deliver_result(tasks.studies.build_alert(kind, uid), destination)
            return received[before:]

        score(1, 0.8)
        first = deliver("first_positive")
        assert sorted(str(ds.SOPClassUID) for ds in first) == [SecondaryCaptureImageStorage, ComprehensiveSRStorage]
        assert deliver("study_summary") == []                         # says nothing new
        score(2, 0.95)                                                # a more suspicious slice
        second = deliver("study_summary")
        [sr] = [ds for ds in second if ds.SOPClassUID == ComprehensiveSRStorage]
        [old] = [ds for ds in first if ds.SOPClassUID == ComprehensiveSRStorage]
        assert sr.SOPInstanceUID != old.SOPInstanceUID and len(second) == 2
        predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert predecessor.ReferencedSOPInstanceUID == old.SOPInstanceUID
        assert deliver("study_summary") == []                         # and once only
    finally:
        server.shutdown()
