"""Fixtures shared by every room: a private redis-server per session, clean per test."""
from __future__ import annotations

import re

import pytest

from tests.services import RedisServer, ServiceProcess

#: Patient identifiers the tests put in their data: the synthetic generator's
#: PatientName/PatientID and the fixed values of tests/ctfactory-based tests.
PATIENT_DATA = re.compile(r"PHANTOM\^[0-9A-F]{6}|PID\d{8}|LEAKCHECK|DOE\^J|MRN99887766|19450317")


@pytest.fixture(scope="session", autouse=True)
def no_patient_data_in_any_log():
    """After the whole session: no log written by any listener or worker process holds a
    patient name or ID (DESIGN §3)."""
    yield
    leaks = []
    for path in ServiceProcess.all_logs:
        if path.exists():
            leaks += [f"{path.name}: {m.group(0)}" for m in PATIENT_DATA.finditer(path.read_text(errors="replace"))]
    assert not leaks, f"patient data in process logs: {leaks[:5]}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of the session's private Redis, emptied before each test."""
    redis_server.client().flushall()
    return redis_server.url
