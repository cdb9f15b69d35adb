"""Wiring: the application entity, its presentation contexts, TLS, and a graceful stop."""
from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
import time

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from ich.settings import Settings

log = logging.getLogger("dicom_listener")

#: Stored as received (the listener never decodes pixels): uncompressed and the common
#: compressed syntaxes a CT or PACS sends. Workers decode them with the pylibjpeg plugins.
#: Deflated Explicit VR is not offered: pynetdicom and pydicom inflate it without a bound
#: (a 261 KiB "deflate bomb" cost +512 MiB), and CT senders fall back to an uncompressed one.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",         # Implicit VR Little Endian (the default, PS3.5 §10.1)
    "1.2.840.10008.1.2.1",       # Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",    # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",    # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",    # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",    # JPEG Lossless, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.80",    # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",    # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",    # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91",    # JPEG 2000
    "1.2.840.10008.1.2.5",       # RLE Lossless
]
assert set(TRANSFER_SYNTAXES) <= set(ALL_TRANSFER_SYNTAXES)

#: Our maximum PDU: larger PDUs mean fewer fragments per 512² slice (DESIGN §6: 148/s at 128 KiB
#: against 98/s at pynetdicom's 16 KiB default).
MAX_PDU = 128 * 1024
#: The longest PDU body read from a peer. The 4-byte length field is the peer's word (up to
#: 4 GiB, PS3.8 §9.3.1): a P-DATA-TF may not exceed the maximum we announce (MAX_PDU), and an
#: A-ASSOCIATE-RQ with the most presentation contexts a peer may propose (128) fits in far
#: less than 1 MiB. Anything longer closes the connection before a byte is allocated for it.
MAX_PDU_BODY = max(MAX_PDU, 1 << 20)
#: How long SIGTERM waits for in-flight associations before aborting them.
DRAIN_S = 30.0
#: How long a new connection may stay silent before its A-ASSOCIATE-RQ (the ARTIM timer of
#: PS3.8 §9.1.5 on an accepted connection). Senders request at once; load-balancer and
#: Kubernetes TCP probes never do, and pynetdicom counts each against ICH_MAX_ASSOCIATIONS until
#: this expires. After the request arrives the full ICH_DICOM_TIMEOUT_S applies again.
ASSOCIATE_RQ_TIMEOUT_S = 5.0


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = MAX_PDU
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.dicom_timeout_s
    ae.require_called_aet = True  # PS3.8 §7.1.1.2: called AE title must be ours
    ae.require_calling_aet = list(settings.allowed_calling_aets)
    return ae


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Server TLS (PS3.15 Annex B secure transport connection profiles): TLS ≥ 1.2 with
    OpenSSL's default ciphers, in the spirit of the BCP 195 profiles; a CA makes client
    certificates required (mutual TLS). Certificates are not matched to calling AE titles."""
    if settings.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_ca is not None:
        context.load_verify_locations(cafile=settings.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class PDUTooLong(OSError):
    """A peer declared a PDU longer than this node accepts (pynetdicom closes the connection:
    it treats an OSError while reading a PDU as the transport closing, PS3.8 Evt17)."""


#: A-ABORT PDU (PS3.8 §9.3.8): source 2 = DICOM UL service-provider, reason 6 = invalid PDU
#: parameter value (Table 9-26): what the peer is told before its connection is closed.
A_ABORT_INVALID_PDU = bytes([0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x02, 0x06])


class BulkRecvSocket(AssociationSocket):
    """pynetdicom reads a PDU in 4 KiB `recv` calls appended to a bytearray: 130 calls and
    copies per 512² slice. One preallocated buffer filled by `recv_into` reads the same bytes
    in 2.8× less time (0.82 → 0.29 ms per 512 KiB on loopback); the contract (return what
    arrived before the peer closed) is unchanged. The buffer is sized only after the declared
    length is checked against MAX_PDU_BODY: the first version allocated whatever a 6-byte
    header declared (three connections declaring 4 GiB took the listener from 83 MiB to 3 GiB,
    issue 14 item 9)."""

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_PDU_BODY:
            log.warning("aborting a connection that declared a %d-byte PDU (longest accepted %d)",
                        nr_bytes, MAX_PDU_BODY)
            try:   # best effort, bounded by the socket's timeout: the peer may not be reading
                self.socket.sendall(A_ABORT_INVALID_PDU)
            except OSError:
                pass
            raise PDUTooLong(f"declared PDU length {nr_bytes} > {MAX_PDU_BODY}")
        buffer = bytearray(nr_bytes)
        view, got = memoryview(buffer), 0
        while got < nr_bytes:
            n = self.socket.recv_into(view[got:], nr_bytes - got)
            if not n:  # connection closed: what we have so far
                del view
                del buffer[got:]
                return buffer
            got += n
        return buffer


class ListenerRequestHandler(RequestHandler):
    def _create_association(self):
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = BulkRecvSocket   # same object, faster recv
        full = assoc.acse_timeout
        if full is None or full > ASSOCIATE_RQ_TIMEOUT_S:
            assoc.acse_timeout = ASSOCIATE_RQ_TIMEOUT_S   # also the ARTIM timer
            assoc.bind(evt.EVT_REQUESTED, _restore_acse_timeout, [full])
        return assoc


def _restore_acse_timeout(event, timeout) -> None:
    event.assoc.acse_timeout = timeout


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's server with three changes. SO_REUSEPORT: several listener processes can
    bind the same DICOM port and the kernel spreads associations across them (one pynetdicom
    process uses about one core, so concurrent senders scale with processes, DESIGN §6).
    The TLS handshake moves out of the accept loop. Sockets read PDUs in bulk."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.RequestHandlerClass = ListenerRequestHandler

    def server_bind(self) -> None:
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """pynetdicom does the TLS handshake here, in the one accepting thread: a TCP probe or
        a slow client that never speaks TLS would stop every other sender. Defer it to the
        association's own thread (OpenSSL completes it on the first read).

        Python makes an accepted socket blocking, without the listening socket's timeout, and
        pynetdicom reads a PDU's body with blocking `recv` calls: a peer that sent a header
        and stalled held its thread and association slot forever (issue 14). Every read and
        write of a connection now gives up after ICH_DICOM_TIMEOUT_S (PS3.8 §9.1.5's ARTIM
        spirit; pynetdicom then treats it as the transport closing, Evt17)."""
        client, address = self.socket.accept()
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address


def start(ae: AE, settings: Settings, handlers: list) -> ThreadedAssociationServer:
    """`ae.start_server(block=False)`, with our server class."""
    server = ae.make_server((settings.dicom_host, settings.dicom_port), evt_handlers=handlers,
                            ssl_context=tls_context(settings), server_class=ListenerServer)
    threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
    ae._servers.append(server)  # as start_server does: ae.shutdown() then stops it too
    log.info("DICOM node %s listening on %s:%d (%s)", settings.ae_title, settings.dicom_host,
             server.server_address[1], "TLS" if settings.tls_cert else "plain TCP")
    return server


def stop(server: ThreadedAssociationServer, drain_s: float = DRAIN_S) -> None:
    """Stop accepting, let in-flight associations finish for up to `drain_s`, abort the rest."""
    socketserver.BaseServer.shutdown(server)  # stop the accept loop, keep associations
    server.server_close()  # new connections are refused from here on
    deadline = time.monotonic() + drain_s
    while _established(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _established(server)
    if left:
        log.warning("aborting %d association(s) still open after %.0f s", len(left), drain_s)
    for assoc in server.active_associations:  # includes bare TCP probes awaiting A-ASSOCIATE
        assoc.abort()
    server.shutdown()


def _established(server: ThreadedAssociationServer) -> list:
    return [assoc for assoc in server.active_associations if assoc.is_established]
