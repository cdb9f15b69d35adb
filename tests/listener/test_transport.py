"""Transport: bulk PDU reads (server.BulkRecvSocket) deliver every size intact, an idle
association costs little CPU, and closed associations leave no file descriptors behind."""
from __future__ import annotations

import os
import time
from pathlib import Path

from pydicom.uid import generate_uid
from pynetdicom import AE as SCU
from pynetdicom.sop_class import Verification

from tests.listener.conftest import AE
from tests.listener.test_listener import associate, ct_slice, statuses
from tests.services import memory_mib


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _closed_by_listener(peers) -> float:
    """Seconds until the listener has closed every socket in `peers` (each closed here too)."""
    started = time.monotonic()
    for peer in peers:
        try:
            assert peer.recv(1) == b""                   # closed by the listener
        except ConnectionResetError:
            pass
        finally:
            peer.close()
    return time.monotonic() - started


def _served_within(port: int, seconds: float, instance: int) -> None:
    """A real sender is answered Success within `seconds` (slots free up asynchronously)."""
    study, series = generate_uid(), generate_uid()
    deadline = time.monotonic() + seconds
    while True:
        try:
            assert statuses(port, [ct_slice(instance, study, series)]) == [0x0000]
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def test_idle_association_does_not_spin(listener):
    scu = SCU(ae_title="TESTSCU")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", listener.port, ae_title=AE)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        before = _cpu_seconds(listener.proc.pid)
        time.sleep(3.0)
        used = _cpu_seconds(listener.proc.pid) - before
        assert assoc.send_c_echo().Status == 0      # still served after the idle spell
    finally:
        assoc.release()
    # pynetdicom's two reactors poll every 1 ms: a few % of a core. A read loop that spins
    # on an idle socket would cost ~100 %.
    assert used < 1.0, f"listener used {used:.2f} s of CPU in 3 s with one idle association"


def test_associations_leave_no_file_descriptors_behind(listener):
    study, series = generate_uid(), generate_uid()
    assert statuses(listener.port, [ct_slice(0, study, series)]) == [0]
    baseline = _open_fds(listener.proc.pid)
    for n in range(1, 16):
        assert statuses(listener.port, [ct_slice(n, study, series)]) == [0]
    deadline = time.monotonic() + 5
    while _open_fds(listener.proc.pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _open_fds(listener.proc.pid) <= baseline


def test_slices_larger_than_one_pdu_arrive_intact(listener, redis_url):
    """512² slices span several 128 KiB PDUs and the bulk reader's partial reads; a 16² one
    fits in one. The queued bytes decode to the pixels that were sent."""
    import numpy as np
    import pydicom
    import redis

    from ich import keys
    from tests.listener.conftest import queued_messages

    study, series = generate_uid(), generate_uid()
    sent = [ct_slice(1, study, series, size=512), ct_slice(2, study, series, size=16),
            ct_slice(3, study, series, size=512)]
    assert statuses(listener.port, sent) == [0, 0, 0]
    client = redis.Redis.from_url(redis_url)
    by_uid = {m["kwargs"]["sop_instance_uid"]: m["kwargs"]["token"] for m in queued_messages(client)}
    for ds in sent:
        stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(
            client.get(keys.slice_bytes(by_uid[ds.SOPInstanceUID]))))
        np.testing.assert_array_equal(stored.pixel_array, ds.pixel_array)


def test_silent_connections_are_closed_early_and_free_their_slots(listener_factory):
    """TCP probes (load balancers, Kubernetes) connect and never send an A-ASSOCIATE-RQ;
    pynetdicom counts each against ICH_MAX_ASSOCIATIONS until its ARTIM timer expires."""
    import socket

    from dicom_listener.server import ASSOCIATE_RQ_TIMEOUT_S

    listener = listener_factory(ICH_MAX_ASSOCIATIONS="2")   # ICH_DICOM_TIMEOUT_S is 10 here
    probes = [socket.create_connection(("127.0.0.1", listener.port), timeout=20) for _ in range(3)]
    waited = _closed_by_listener(probes)
    assert ASSOCIATE_RQ_TIMEOUT_S - 1 < waited < 9.0, f"probes closed after {waited:.1f} s"
    # Slots are free again: each probe's thread ends just after its socket closes, so allow
    # the moment it takes (the CI run that asked at once was refused "local limit exceeded").
    _served_within(listener.port, 3.0, 0)


def test_a_declared_giant_pdu_allocates_nothing_and_is_aborted(listener):
    """A 6-byte header may declare a 4 GiB PDU (PS3.8 §9.3.1). 16 such connections must leave
    the listener's peak memory within 50 MiB of idle, each be answered with an A-ABORT (invalid
    PDU parameter value) and closed at once, and a real sender must be served while attackers
    keep coming (issue 14 item 9)."""
    import socket
    import threading

    from dicom_listener.server import A_ABORT_INVALID_PDU

    def attack() -> bytes:
        s = socket.create_connection(("127.0.0.1", listener.port), timeout=10)
        s.sendall(b"\x01\x00\xff\xff\xff\xff")        # A-ASSOCIATE-RQ, length 4 GiB - 1
        return s

    def answer(peer) -> bytes:   # what an attacker reads before its connection is closed
        got = b""
        try:
            while len(got) < len(A_ABORT_INVALID_PDU) and (chunk := peer.recv(64)):
                got += chunk
        except ConnectionResetError:
            pass
        return got

    idle = memory_mib(listener.proc.pid)
    peers = [attack() for _ in range(16)]
    answers = [answer(peer) for peer in peers]
    assert _closed_by_listener(peers) < 5
    assert answers == [A_ABORT_INVALID_PDU] * 16
    # Each aborted connection holds its slot until the association's ARTIM wait for an
    # A-ASSOCIATE-RQ ends (ASSOCIATE_RQ_TIMEOUT_S, as a silent TCP probe does); then a sender
    # is let in.
    _served_within(listener.port, 10, instance=20)
    # A sender in the middle of its association is served while 16 more arrive and are aborted.
    study, series = generate_uid(), generate_uid()
    slices = [ct_slice(i, study, series) for i in range(10)]
    assoc = associate(listener.port, slices[:1])
    try:
        got = [assoc.send_c_store(ds).get("Status", -1) for ds in slices[:5]]
        outcome = []   # filled only if the thread ran to its end: its failures are not lost

        def attack_sixteen():
            more = [attack() for _ in range(16)]
            outcome.append(([answer(peer) for peer in more], _closed_by_listener(more)))

        attackers = threading.Thread(target=attack_sixteen)
        attackers.start()
        got += [assoc.send_c_store(ds).get("Status", -1) for ds in slices[5:]]
        attackers.join(15)
    finally:
        assoc.release()
    assert got == [0x0000] * 10
    assert not attackers.is_alive() and outcome, "the attackers did not finish"
    assert outcome[0][0] == [A_ABORT_INVALID_PDU] * 16 and outcome[0][1] < 5
    _served_within(listener.port, 10, instance=11)       # and a new sender after them
    peak = memory_mib(listener.proc.pid, "VmHWM")
    assert peak - idle < 50, f"peak RSS {peak:.0f} MiB against {idle:.0f} MiB idle"
    print(f"listener RSS idle {idle:.0f} MiB, peak under attack {peak:.0f} MiB")
    assert "declared a 4294967295-byte PDU" in listener.log()


def test_a_peer_that_stalls_inside_a_pdu_is_closed_after_the_network_timeout(listener_factory):
    """A valid header, a few bytes of the body, then silence (a hung sender, or one holding
    slots on purpose). pynetdicom reads the body with blocking `recv` calls on the accepted
    socket, which Python leaves without a timeout: without one the reader waits forever and
    the association slot is never freed. Each connection is closed after ICH_DICOM_TIMEOUT_S."""
    import socket

    listener = listener_factory(ICH_MAX_ASSOCIATIONS="2", ICH_DICOM_TIMEOUT_S="3")
    peers = []
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", listener.port), timeout=30)
        s.sendall(b"\x01\x00\x00\x00\x10\x00" + b"\x00" * 100)   # A-ASSOCIATE-RQ of 4 KiB: 100 B sent
        peers.append(s)
    waited = _closed_by_listener(peers)
    assert 2.0 < waited < 12.0, f"stalled peers closed after {waited:.1f} s"
    _served_within(listener.port, 10, instance=2)        # their slots are free again
