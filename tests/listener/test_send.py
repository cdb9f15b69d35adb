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
