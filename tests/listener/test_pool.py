"""`python -m dicom_listener --processes N` (issue 15): several processes on one port, one
/metrics summed over them, a dead child restarted, SIGTERM drains them all."""
from __future__ import annotations

import re
import signal
import threading
import time

import redis
from pydicom.uid import generate_uid
from pynetdicom import AE as SCU

from dicom_listener.send import responses_stay_queued
from tests.listener.conftest import AE, queued_messages
from tests.listener.test_listener import ct_slice

ASSOCIATIONS, PER_ASSOCIATION = 8, 15


def send(port: int, study: str, count: int, statuses: list, pause_s: float = 0.0) -> None:
    scu = SCU(ae_title="POOLSCU")
    slices = [ct_slice(n, study, generate_uid()) for n in range(count)]
    scu.add_requested_context(slices[0].SOPClassUID, slices[0].file_meta.TransferSyntaxUID)
    assoc = scu.associate("127.0.0.1", port, ae_title=AE)
    assert assoc.is_established
    responses_stay_queued(assoc)
    for ds in slices:
        statuses.append((ds.SOPInstanceUID, assoc.send_c_store(ds).get("Status", -1)))
        time.sleep(pause_s)
    assoc.release()


def child_pids(listener) -> list[int]:
    return [int(p) for p in re.findall(r"listener process \d+ started \(pid (\d+)\)", listener.log())]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_two_processes_store_every_instance_once_and_sum_their_metrics(listener_factory, redis_url):
    listener = listener_factory(ICH_LISTENER_PROCESSES="2")
    wait_for(lambda: len(child_pids(listener)) == 2, 30, "two children did not start")
    time.sleep(2.0)   # both children bound the port (the parent waited for the first only)
    study = generate_uid()
    statuses: list = []
    threads = [threading.Thread(target=send, args=(listener.port, study, PER_ASSOCIATION, statuses))
               for _ in range(ASSOCIATIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    total = ASSOCIATIONS * PER_ASSOCIATION
    assert len(statuses) == total and {s for _, s in statuses} == {0x0000}
    client = redis.Redis.from_url(redis_url)
    stored = [m["kwargs"]["sop_instance_uid"] for m in queued_messages(client)]
    assert sorted(stored) == sorted(uid for uid, _ in statuses), "an instance stored twice or lost"
    m = listener.metrics()
    assert m["ich_instances_queued_total"] == m["ich_instances_received_total"] == total
    assert m['ich_associations_total{outcome="released"}'] == ASSOCIATIONS
    assert m["ich_listener_processes"] == 2 and m["ich_queue_depth"] == total
    # Both children took associations: the kernel spread them (SO_REUSEPORT).
    served = {pid for pid in child_pids(listener)
              if re.search(rf"dicom_listener[.\w]*\[{pid}\]: association", listener.log())}
    assert len(served) == 2, f"associations by child: {served}\n{listener.log()[-2000:]}"


def test_a_dead_child_is_restarted_and_sigterm_drains_every_child(listener_factory, redis_url):
    listener = listener_factory(ICH_LISTENER_PROCESSES="2")
    wait_for(lambda: len(child_pids(listener)) == 2, 30, "two children did not start")
    first, second = child_pids(listener)
    import os
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(child_pids(listener)) == 3, 30, "the dead child was not restarted")
    wait_for(lambda: listener.metrics().get("ich_listener_processes") == 2, 10, "not 2 alive")
    assert listener.metrics()["ich_listener_restarts_total"] == 1
    time.sleep(2.0)
    # A slow association is open in some child when the pool is told to stop: it completes.
    statuses: list = []
    sender = threading.Thread(target=send, args=(listener.port, generate_uid(), 40, statuses, 0.03))
    sender.start()
    time.sleep(0.5)
    listener.proc.send_signal(signal.SIGTERM)
    sender.join(60)
    assert listener.proc.wait(45) == 0
    assert len(statuses) == 40 and {s for _, s in statuses} == {0x0000}
    for pid in child_pids(listener):
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
