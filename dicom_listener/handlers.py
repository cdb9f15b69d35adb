"""pynetdicom event handlers: thin, catching at the edge, always answering a named status.

The C-STORE handler parses the header, asks `policy.classify`, and for a CT slice hands the
bytes exactly as received to Redis; Success is returned only after Redis accepted them
(DESIGN §4). Association handlers keep per-association counts for one INFO line at the end.
"""
from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import redis
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event

from dicom_listener import policy
from dicom_listener.metrics import ListenerMetrics
from ich.queue import QueueFull, SliceQueue

log = logging.getLogger("dicom_listener")


@dataclass
class AssociationStats:
    calling_ae: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    counts: Counter = field(default_factory=Counter)


class Handlers:
    """The listener's event handlers, bound to one queue and one metrics set."""

    def __init__(self, queue: SliceQueue, metrics: ListenerMetrics) -> None:
        self.queue = queue
        self.metrics = metrics
        self._stats: dict[int, AssociationStats] = {}

    def bindings(self) -> list[tuple]:
        return [
            (evt.EVT_CONN_OPEN, self.on_connection_open),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_outcome, ["rejected"]),
            (evt.EVT_RELEASED, self.on_outcome, ["released"]),
            (evt.EVT_ABORTED, self.on_outcome, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self.on_connection_close),
            (evt.EVT_C_STORE, self.handle_store),
        ]

    # --- C-STORE ---------------------------------------------------------------------------

    def handle_store(self, event: Event) -> Dataset:
        started = time.perf_counter()
        self.metrics.received.inc()
        stats = self._stats.get(id(event.assoc))
        try:
            status, action, reason = self._store(event)
        finally:
            self.metrics.handler_seconds.observe(time.perf_counter() - started)
        if stats is not None:
            stats.counts["received"] += 1
            stats.counts[action] += 1
        response = Dataset()
        response.Status = status
        if reason and status != policy.SUCCESS:
            response.ErrorComment = reason[:64]  # (0000,0902) LO: tells the sender why
        return response

    def _store(self, event: Event) -> tuple[int, str, str]:
        request = event.request
        try:
            ds = event.dataset
            ds.file_meta = file_meta = event.file_meta  # carries the negotiated transfer syntax
            decision = policy.classify(ds, request.AffectedSOPClassUID,
                                       request.AffectedSOPInstanceUID)
            meta = (policy.slice_meta(ds, _ae(event), received_at=time.time())
                    if decision.action == "queue" else None)
        except Exception as exc:  # pydicom raises many types for a malformed data set
            log.warning("C-STORE from %s: cannot parse data set (%s)", _ae(event),
                        type(exc).__name__)
            return self._reject("undecodable", policy.CANNOT_UNDERSTAND)

        if decision.action == "ignore":
            self.metrics.ignored.labels(decision.reason).inc()
            log.info("C-STORE from %s: %s instance ignored (%s)", _ae(event),
                     request.AffectedSOPClassUID.name, decision.reason)
            return policy.SUCCESS, "ignored", decision.reason
        if decision.action == "reject":
            log.warning("C-STORE from %s: refused (%s)", _ae(event), decision.reason)
            return self._reject(decision.reason, decision.status)

        try:
            self.queue.enqueue(part10(request, file_meta), meta)
        except QueueFull as exc:
            log.warning("C-STORE from %s: refused, %s (ICH_MAX_QUEUE)", _ae(event), exc)
            return self._reject("queue_full", policy.OUT_OF_RESOURCES)
        except redis.RedisError as exc:
            log.error("C-STORE from %s: refused, Redis unavailable (%s)", _ae(event),
                      type(exc).__name__)
            return self._reject("redis_unavailable", policy.OUT_OF_RESOURCES)
        self.metrics.queued.inc()
        return policy.SUCCESS, "queued", ""

    def _reject(self, reason: str, status: int) -> tuple[int, str, str]:
        self.metrics.rejected.labels(reason).inc()
        return status, "rejected", reason

    # --- associations ----------------------------------------------------------------------

    def on_connection_open(self, event: Event) -> None:
        """pynetdicom leaves Nagle on: each small C-STORE-RSP then waits ~40 ms for a delayed
        ACK, capping a sender at ~20 instances/s. Turn it off on every accepted socket."""
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def on_accepted(self, event: Event) -> None:
        self.metrics.associations.labels("accepted").inc()
        self.metrics.associations_active.inc()
        peer = f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"
        self._stats[id(event.assoc)] = AssociationStats(_ae(event), peer)

    def on_outcome(self, event: Event, outcome: str) -> None:
        self.metrics.associations.labels(outcome).inc()
        if outcome == "rejected":
            log.warning("association from %s (%s:%s) rejected", _ae(event),
                        event.assoc.requestor.address, event.assoc.requestor.port)

    def on_connection_close(self, event: Event) -> None:
        stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        self.metrics.associations_active.dec()
        c = stats.counts
        log.info("association from %s (%s) closed after %.1f s: received %d, queued %d, "
                 "ignored %d, rejected %d", stats.calling_ae, stats.peer,
                 time.monotonic() - stats.started, c["received"], c["queued"], c["ignored"],
                 c["rejected"])


def part10(request, file_meta) -> bytes:
    """The instance as received, as a DICOM Part 10 file (PS3.10 §7.1: preamble, "DICM", file
    meta, data set): what `Event.encoded_dataset()` returns, without building the file meta a
    second time or copying the data set out of its buffer first."""
    with request.DataSet.getbuffer() as data_set:
        return b"".join((b"\x00" * 128, b"DICM", encode_file_meta(file_meta), data_set))


def _ae(event: Event) -> str:
    """Calling AE title: an equipment name, safe to log (not patient data)."""
    return str(event.assoc.requestor.ae_title).strip()
