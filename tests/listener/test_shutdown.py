"""SIGTERM: stop accepting, let the open association finish, exit cleanly."""
from __future__ import annotations

import signal
import subprocess
import threading
import time

import redis
from pydicom.uid import generate_uid

from ich import keys
from tests.listener.conftest import AE
from tests.listener.test_listener import associate, ct_slice


def test_sigterm_drains_the_open_association_and_refuses_new_ones(listener, redis_url):
    study, series = generate_uid(), generate_uid()
    slices = [ct_slice(n, study, series) for n in range(60)]
    assoc = associate(listener.port, slices[:1], calling="SLOWSCU")
    got: list[int] = []

    def run() -> None:
        for ds in slices:
            got.append(assoc.send_c_store(ds).get("Status", -1))
            time.sleep(0.03)
        assoc.release()

    sender = threading.Thread(target=run)
    sender.start()
    time.sleep(0.5)
    listener.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    late = subprocess.run(["echoscu", "-aec", AE, "127.0.0.1", str(listener.port)],
                          capture_output=True, timeout=30)
    sender.join(30)
    assert late.returncode != 0, "a new association was accepted while draining"
    assert got == [0] * len(slices)
    assert listener.proc.wait(30) == 0
    assert redis.Redis.from_url(redis_url).llen(keys.SCORE_QUEUE) == len(slices)
    assert "stopped" in listener.log()
