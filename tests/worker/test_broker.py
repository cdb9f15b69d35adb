"""The broker options a killed worker's slices depend on are really applied by the installed
kombu (DESIGN §4): an older kombu silently ignores `unacked_restore_interval`/`_throttle` and
sweeps every ~100 s instead of every few seconds."""
from __future__ import annotations

import pytest


def test_the_redis_transport_applies_the_unacked_restore_options(redis_server):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ICH_REDIS_URL", redis_server.url)
        from worker.celery import app, settings
    options = app.conf.broker_transport_options
    with app.connection_for_write(redis_server.url) as conn:
        channel = conn.default_channel
        assert channel.visibility_timeout == settings.visibility_timeout_s
        assert channel.unacked_restore_interval == options["unacked_restore_interval"] <= 5
        assert channel.unacked_restore_throttle == 1


def test_the_declared_requirements_cannot_bring_a_kombu_without_the_restore_options():
    """Issue 14 item 5: the options above exist from kombu 5.7; with `celery[redis]>=5.5` alone
    pip could install kombu 5.5 or 5.6, which ignores them and restores every ~100 s. The test
    above checks the installed kombu; this one checks what a fresh install may pick."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    kombu = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "kombu"]
    assert kombu, "kombu is not pinned: celery[redis] alone allows kombu < 5.7"
    for old in ("5.5.4", "5.6.2", "5.7.0rc1"):
        assert not kombu[0].specifier.contains(old, prereleases=True), old
    assert kombu[0].specifier.contains("5.7.0")


def test_the_procfile_alerts_worker_behind_a_hanging_consumer_reserves_one_delivery_per_thread(
        redis_server, tmp_path):
    """Issue 14 item 7: reserved deliveries wait unacknowledged; held past the visibility
    timeout they are redelivered and POSTed twice. The alerts worker as the Procfile runs it
    (`--prefetch-multiplier 1`, 8 threads) reserves one per thread; with the scoring prefetch
    (2 × ICH_BATCH_MAX per thread) it reserved every queued delivery."""
    import shlex
    import socket
    import time
    import uuid

    import redis

    from ich import keys
    from ich.queue import DELIVER_TASK, task_message
    from tests.services import ServiceProcess, free_port, procfile, wait_for_port

    argv = shlex.split(procfile()["alerts"])
    assert argv[:2] == ["celery", "-A"]
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(100)                       # accepts connections, never answers
    url = f"http://127.0.0.1:{hang.getsockname()[1]}/hook"
    client = redis.Redis.from_url(redis_server.url)
    client.delete(keys.ALERTS_QUEUE, "unacked", "unacked_index")
    for i in range(40):
        alert = {"alert_id": f"hang-{i}", "kind": "study_summary", "study_instance_uid": f"1.2.{i}"}
        client.lpush(keys.ALERTS_QUEUE, task_message(DELIVER_TASK, keys.ALERTS_QUEUE, str(uuid.uuid4()),
                                                     args=(alert, url)))
    metrics = free_port()
    proc = ServiceProcess(["-m", *argv[0:1], *argv[1:]],
                          {"ICH_REDIS_URL": redis_server.url, "ICH_WEBHOOK_URLS": url,
                           "ICH_WEBHOOK_SECRET": "s", "ICH_ALERTS_METRICS_PORT": str(metrics)},
                          tmp_path / "alerts-hang.log").start()
    try:
        wait_for_port(metrics, timeout=60)
        time.sleep(3.0)
        reserved = client.hlen("unacked")
        assert 1 <= reserved <= 10, f"{reserved} deliveries reserved by 8 threads"
        assert client.llen(keys.ALERTS_QUEUE) >= 30
    finally:
        proc.stop()
        hang.close()
        client.delete(keys.ALERTS_QUEUE, "unacked", "unacked_index")
