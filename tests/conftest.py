"""Fixtures shared by every room: a private redis-server per session, clean per test."""
from __future__ import annotations

import pytest

from tests.services import RedisServer


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
