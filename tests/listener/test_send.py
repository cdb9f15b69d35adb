"""`dicom_listener.send` against pynetdicom's requestor race (pydicom/pynetdicom#875): the
association's reactor thread can take the C-STORE response `send_c_store` waits for; the sender
then waits out its DIMSE timeout and aborts the association. The race is widened here so that
it happens on every store: the reactor is pre-empted right after its pause check, and the
sending thread reaches its wait a little late."""
from __future__ import annotations

import threading
import time
from collections import Counter

import pynetdicom.association
import pytest
import pynetdicom.dimse
from pydicom.uid import generate_uid

from dicom_listener import send
from tests.listener.conftest import AE
from tests.listener.test_listener import ct_slice


class _PreemptedAfterWait(threading.Event):
    """A reactor checkpoint whose wait() returns as if the reactor then lost the CPU."""

    def wait(self, timeout=None):
        flag = super().wait(timeout)
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.02)
        return flag


def test_the_sender_never_loses_a_store_response_to_its_reactor(listener, monkeypatch):
    init = pynetdicom.association.Association.__init__

    def preempted_reactor(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._reactor_checkpoint = _PreemptedAfterWait()
        self._reactor_checkpoint.set()

    get_msg = pynetdicom.dimse.DIMSEServiceProvider.get_msg

    def late_waiter(self, block=False):
        if block:
            time.sleep(0.05)
        return get_msg(self, block)

    class ShortTimeoutAE(send.AE):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.dimse_timeout = 3

    monkeypatch.setattr(pynetdicom.association.Association, "__init__", preempted_reactor)
    monkeypatch.setattr(pynetdicom.dimse.DIMSEServiceProvider, "get_msg", late_waiter)
    monkeypatch.setattr(send, "AE", ShortTimeoutAE)
    study, series = generate_uid(), generate_uid()
    slices = [ct_slice(n, study, series) for n in range(1, 9)]
    started = time.monotonic()
    assert send.send("127.0.0.1", listener.port, AE, "TESTSCU", slices) == Counter({"0x0000": 8})
    assert time.monotonic() - started < 2.5   # no store waited out a DIMSE timeout


def test_also_stores_the_same_study_at_a_pacs_first(listener, capsys):
    """`make demo` with ICH_DEMO_PACS: the phantom study goes to the PACS as well, so the SR and
    key image ICH Watch sends back land in a study that holds its slices."""
    from pynetdicom import AE as SCP, AllStoragePresentationContexts, evt

    from tests.services import free_port

    got: list[str] = []

    def stored(event):
        got.append(event.dataset.SOPInstanceUID)
        return 0x0000

    pacs = SCP(ae_title="PACS")
    pacs.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, stored)])
    try:
        argv = ["--synthetic-studies", "1", "--seed", "3", "--site", "legacy", "--positive",
                "--port", str(listener.port), "--called-aet", AE, "--also", f"PACS@127.0.0.1:{port}"]
        assert send.main(argv) == 0
    finally:
        server.shutdown()
    sent = [ds.SOPInstanceUID for ds in send.synthetic_datasets(1, 3, True, "legacy")]
    assert sorted(got) == sorted(sent) and len(sent) > 5
    out = capsys.readouterr().out
    assert f"also stored at PACS@127.0.0.1:{port}" in out and f"sent {len(sent)} instances" in out
    with pytest.raises(SystemExit) as refused:   # a malformed destination, before any send
        send.main(["--synthetic-studies", "1", "--also", "PACS:4242"])
    assert refused.value.code == 2 and "not AET@host:port" in capsys.readouterr().err
