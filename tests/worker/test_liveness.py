"""A scoring worker says whether it consumes (`worker.liveness`): it touches
ICH_WORKER_ALIVE_FILE unless slices wait while it starts no batch, and the probe reads the file.

The stall Celery can fall into after a Redis reset (celery/celery#10205) could not be
reproduced on demand (24 forced Redis crashes, docs/deployment.md); its symptom, a live worker
that consumes nothing while slices wait, is made here by cancelling the worker's consumer
through Celery's own remote control."""
from __future__ import annotations

import os
import time

import pytest
import redis
from celery import Celery

from ich import keys
from tests.modelfactory import blood_detector
from tests.pipeline import Pipeline
from tests.services import RedisServer, WebhookReceiver
from worker import liveness


def _age(path) -> float:
    return time.time() - os.stat(path).st_mtime


def test_the_file_is_touched_unless_slices_wait_while_no_batch_starts(tmp_path, capsys):
    server = RedisServer(tmp_path / "redis").start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        alive = liveness.Liveness(client, keys.SCORE_QUEUE, tmp_path / "alive", stall_s=0.5)
        assert alive.check() and _age(tmp_path / "alive") < 0.5          # idle: alive
        client.rpush(keys.SCORE_QUEUE, b"a slice")
        assert alive.check()                   # waiting, not yet for stall_s
        time.sleep(0.6)
        assert not alive.check()               # waited 0.6 s and no batch started
        time.sleep(0.1)
        assert liveness.main([str(tmp_path / "alive"), "--max-age", "0.5"]) == 1
        assert "not alive" in capsys.readouterr().err
        alive.consumed()                       # a batch started: consuming again
        assert alive.check() and liveness.main([str(tmp_path / "alive"), "--max-age", "0.5"]) == 0
        time.sleep(0.6)
        assert not alive.check()               # still waiting, nothing started since
        client.delete(keys.SCORE_QUEUE)
        assert alive.check()                   # drained (by another worker): alive
        client.rpush(keys.SCORE_QUEUE, b"a slice")
        alive.check()
        time.sleep(0.6)
        assert not alive.check()
    finally:
        server.stop()
    # Redis gone is not a stall: restarting the worker would not bring Redis back.
    assert alive.check()


def test_the_probe_fails_on_a_missing_file(tmp_path, capsys):
    assert liveness.main([str(tmp_path / "never-written")]) == 1
    assert "not alive" in capsys.readouterr().err


def test_a_worker_whose_consumer_stops_fails_its_probe_and_recovers(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    receiver = WebhookReceiver(lambda body: 200)
    alive = tmp_path / "alive"
    pipeline = Pipeline(tmp_path, server, receiver, blood_detector(tmp_path / "models"),
                        ICH_WORKER_ALIVE_FILE=str(alive), ICH_WORKER_STALL_S="2")
    control = Celery(broker=server.url).control
    try:
        pipeline.scoring.start(wait_port=pipeline.score_metrics, timeout=120)
        _until(lambda: alive.exists() and liveness.main([str(alive), "--max-age", "2"]) == 0, 30)
        pipeline.wait_scored(pipeline.send_study(4), 4)

        assert control.cancel_consumer(keys.SCORE_QUEUE, reply=True, timeout=10)
        study = pipeline.send_study(4)
        _until(lambda: liveness.main([str(alive), "--max-age", "2"]) == 1, 30)
        assert pipeline.client.llen(keys.SCORE_QUEUE) == 4 and not pipeline.results(study)
        assert "its consumer looks stalled" in pipeline.scoring.log()

        assert control.add_consumer(keys.SCORE_QUEUE, reply=True, timeout=10)
        pipeline.wait_scored(study, 4)
        _until(lambda: liveness.main([str(alive), "--max-age", "2"]) == 0, 30)
    finally:
        pipeline.scoring.stop()
        receiver.close()
        server.stop()


def _until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s")
        time.sleep(0.2)
