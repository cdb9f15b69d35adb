"""The slice ledger and its reconciler (issue 14): what the broker loses is re-queued; what is
queued, in flight or resolved is left alone. Real Redis, real kombu consumers."""
from __future__ import annotations

import json

import pytest
import redis
from kombu import Connection
from pydicom.uid import generate_uid

from ich import keys
from ich.decision import StudyRule
from ich.queue import QueueFull, SliceMeta, SliceQueue
from worker.reconcile import Reconciler, task_id
from worker.study import SliceResult, StudyStore


@pytest.fixture
def client(redis_url):
    return redis.Redis.from_url(redis_url)


def enqueue(client, n: int = 1, max_depth: int = 100) -> list[SliceMeta]:
    queue, study = SliceQueue(client, max_depth, 600), generate_uid()
    metas = [SliceMeta(study, generate_uid(), generate_uid(), instance_number=i) for i in range(n)]
    for m in metas:
        queue.enqueue(b"DICM bytes", m)
    return metas


def test_the_listener_writes_each_accepted_slice_to_the_ledger_and_nothing_it_refuses(client):
    metas = enqueue(client, 2, max_depth=2)
    ledger = {t.decode() for t in client.zrange(keys.LEDGER, 0, -1)}
    assert ledger == {m.token for m in metas}
    assert [task_id(client.hget(keys.LEDGER_MESSAGES, m.token)) for m in metas] == [m.token for m in metas]
    with pytest.raises(QueueFull):
        enqueue(client, 1, max_depth=2)
    assert client.zcard(keys.LEDGER) == client.hlen(keys.LEDGER_MESSAGES) == 2


def test_a_message_popped_by_a_consumer_that_died_is_requeued_at_the_second_look(client):
    """kombu's BRPOP window (issue 14 item 4): the message left the queue, the consumer died
    before kombu recorded it as unacknowledged. Nothing but the ledger remembers it."""
    lost, kept = enqueue(client, 2)
    original = client.hget(keys.LEDGER_MESSAGES, lost.token)
    popped = client.brpop(keys.SCORE_QUEUE, 1)[1]   # the oldest: `lost`; its consumer dies here
    assert task_id(popped) == lost.token
    reconciler = Reconciler(client, older_than_s=0)
    assert reconciler.sweep() == []                   # first look: a suspect only
    assert reconciler.sweep() == [lost.token]         # second look: still nowhere
    assert client.lrange(keys.SCORE_QUEUE, -1, -1) == [original]   # next to be popped
    assert client.llen(keys.SCORE_QUEUE) == 2
    assert reconciler.sweep() == [] and reconciler.sweep() == []   # queued again: left alone


def test_young_queued_and_unacknowledged_slices_are_left_alone(client, redis_url):
    young = Reconciler(client, older_than_s=3600)
    enqueue(client, 1)
    client.brpop(keys.SCORE_QUEUE, 1)
    assert young.sweep() == [] and young.sweep() == []   # lost, but not yet overdue
    client.delete(keys.LEDGER, keys.LEDGER_MESSAGES)

    queued, taken = enqueue(client, 2)
    with Connection(redis_url) as conn:   # a real kombu consumer takes one, without acking
        message = conn.default_channel.basic_get(keys.SCORE_QUEUE, no_ack=False)
        assert message.headers["id"] == queued.token
        assert client.hlen(keys.KOMBU_UNACKED) == 1
        reconciler = Reconciler(client, older_than_s=0)
        assert [reconciler.sweep() for _ in range(3)] == [[], [], []]
        assert client.llen(keys.SCORE_QUEUE) == 1


def test_a_recorded_result_resolves_the_ledger_entry(client):
    meta, = enqueue(client, 1)
    client.brpop(keys.SCORE_QUEUE, 1)
    reconciler = Reconciler(client, older_than_s=0)
    assert reconciler.sweep() == []
    StudyStore(client, 600).record([SliceResult(meta, {"any": 0.1}, scored_at=1.0)],
                                   StudyRule.from_card(None, {"any": 0.15}), "v1")
    assert client.zcard(keys.LEDGER) == client.hlen(keys.LEDGER_MESSAGES) == 0
    assert reconciler.sweep() == [] and client.llen(keys.SCORE_QUEUE) == 0


def test_two_reconcilers_requeue_a_lost_slice_once(client):
    enqueue(client, 1)
    client.brpop(keys.SCORE_QUEUE, 1)
    a, b = Reconciler(client, older_than_s=0), Reconciler(client, older_than_s=0)
    a.sweep(), b.sweep()
    assert len(a.sweep()) + len(b.sweep()) == 1
    assert client.llen(keys.SCORE_QUEUE) == 1


def test_the_queue_is_read_in_bounded_chunks(client):
    """A deep backlog is scanned a chunk at a time; every queued token is seen."""
    metas = enqueue(client, 23)
    seen = Reconciler(client, older_than_s=0, chunk=5).in_flight()
    assert seen == {m.token for m in metas}
    unrelated = json.dumps({"headers": {}}).encode()
    client.lpush(keys.SCORE_QUEUE, unrelated, b"not json")
    assert Reconciler(client, older_than_s=0, chunk=5).in_flight() == seen
