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
