"""Worker room: real Celery workers (scoring, alerts) as the Procfile runs them, a private Redis,
a real HTTP consumer, and the tiny `blood_detector` model. Started once per module: tests
use their own study UIDs and compare counters before and after."""
from __future__ import annotations

import pytest

from tests.modelfactory import blood_detector
from tests.pipeline import SECRET, Pipeline, ScriptedReceiver  # noqa: F401 (SECRET: tests import it)
from tests.services import RedisServer


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    redis_server = RedisServer(tmp / "redis").start()
    receiver = ScriptedReceiver()
    model = blood_detector(tmp / "models")
    p = Pipeline(tmp, redis_server, receiver, model).start()
    yield p
    p.stop()
    receiver.close()
    redis_server.stop()
