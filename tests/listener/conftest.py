"""Listener room: the real `python -m dicom_listener` process against a private Redis."""
from __future__ import annotations

import json
import base64
import time

import pytest

from ich import keys
from tests.services import ServiceProcess, free_port, metrics_text

AE = "ICHWATCH"


class Listener(ServiceProcess):
    def __init__(self, tmp_path, redis_url: str, port: int | None = None, **env: str) -> None:
        self.port, self.metrics_port = port or free_port(), free_port()
        super().__init__(["-m", "dicom_listener"], {
            "ICH_REDIS_URL": redis_url, "ICH_DICOM_PORT": str(self.port),
            "ICH_DICOM_HOST": "127.0.0.1", "ICH_AE_TITLE": AE,
            "ICH_LISTENER_METRICS_PORT": str(self.metrics_port), "ICH_DICOM_TIMEOUT_S": "10",
            **env}, tmp_path / f"listener-{self.port}-{self.metrics_port}.log")

    def start(self, timeout: float = 60.0, **kw) -> "Listener":
        """Started once its own DICOM socket is bound. With SO_REUSEPORT another listener may
        already answer on the port, so a connection proves nothing; its log line does."""
        super().start(wait_port=self.port, timeout=timeout, **kw)
        deadline = time.monotonic() + timeout
        while "listening on" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the listener did not bind port {self.port}:\n{self.log()}")
            time.sleep(0.05)
        return self

    def metrics(self) -> dict[str, float]:
        return metrics_text(self.metrics_port)


@pytest.fixture
def listener_factory(tmp_path, redis_url):
    started: list[Listener] = []

    def make(redis=None, port=None, **env) -> Listener:
        listener = Listener(tmp_path, redis or redis_url, port, **env).start()
        started.append(listener)
        return listener

    yield make
    for listener in started:
        listener.stop()


@pytest.fixture
def listener(listener_factory):
    return listener_factory()


def queued_messages(client) -> list[dict]:
    """Every task message in the score queue, oldest first, as (headers, kwargs)."""
    out = []
    for raw in reversed(client.lrange(keys.SCORE_QUEUE, 0, -1)):
        envelope = json.loads(raw)
        args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        out.append({"headers": envelope["headers"], "kwargs": kwargs, "envelope": envelope})
    return out
