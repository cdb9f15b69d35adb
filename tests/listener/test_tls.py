"""DICOM TLS (PS3.15 B.1): a TLS storescu succeeds, plain TCP fails; a CA makes it mutual."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import redis
from pydicom.uid import generate_uid

from ich import keys
from tests.ctfactory import ct_dataset, head_hu, to_bytes
from tests.listener.conftest import AE


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)
    return d


def send(port: int, file: Path, *tls: str) -> int:
    return subprocess.run(["storescu", "-aec", AE, *tls, "127.0.0.1", str(port), str(file)],
                          capture_output=True, timeout=60).returncode


@pytest.fixture
def slice_file(tmp_path) -> Path:
    path = tmp_path / "ct.dcm"
    ds = ct_dataset(head_hu())
    ds.StudyInstanceUID = generate_uid()
    path.write_bytes(to_bytes(ds))
    return path


def test_tls_and_mutual_tls(listener_factory, pki, slice_file, redis_url):
    listener = listener_factory(ICH_TLS_CERT=str(pki / "server.crt"),
                                ICH_TLS_KEY=str(pki / "server.key"), ICH_TLS_CA=str(pki / "ca.crt"))
    client_tls = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")]
    assert send(listener.port, slice_file, *client_tls) == 0
    assert send(listener.port, slice_file) != 0  # plain TCP to a TLS port
    # Mutual TLS: a client without a certificate is refused during the handshake.
    assert send(listener.port, slice_file, "+tla", "+cf", str(pki / "ca.crt")) != 0
    assert send(listener.port, slice_file, *client_tls) == 0  # failed handshakes harm nothing
    assert redis.Redis.from_url(redis_url).llen(keys.SCORE_QUEUE) == 2


def test_server_only_tls_accepts_anonymous_clients(listener_factory, pki, slice_file, redis_url):
    listener = listener_factory(ICH_TLS_CERT=str(pki / "server.crt"),
                                ICH_TLS_KEY=str(pki / "server.key"))
    assert send(listener.port, slice_file, "+tla", "+cf", str(pki / "ca.crt")) == 0
    assert send(listener.port, slice_file) != 0
    assert redis.Redis.from_url(redis_url).llen(keys.SCORE_QUEUE) == 1


def test_a_silent_tcp_client_does_not_block_tls_handshakes(listener_factory, pki, slice_file, redis_url):
    """A TCP probe (or a slow client) that never speaks TLS must not hold the accept loop."""
    import socket

    listener = listener_factory(ICH_TLS_CERT=str(pki / "server.crt"),
                                ICH_TLS_KEY=str(pki / "server.key"))
    with socket.create_connection(("127.0.0.1", listener.port)):
        tls = ["+tla", "+cf", str(pki / "ca.crt")]
        assert send(listener.port, slice_file, *tls) == 0
    assert redis.Redis.from_url(redis_url).llen(keys.SCORE_QUEUE) == 1


def test_results_are_stored_over_tls_to_a_tls_pacs(listener_factory, pki, redis_url):
    """Issue 15: the results SCU speaks DICOM TLS where configured (ICH_RESULT_TLS_CA, with
    ICH_TLS_CERT/KEY as its client certificate). Our own TLS listener plays the PACS: it
    accepts any storage class, and queues a CT slice."""
    from worker import pacs

    listener = listener_factory(ICH_TLS_CERT=str(pki / "server.crt"),
                                ICH_TLS_KEY=str(pki / "server.key"), ICH_TLS_CA=str(pki / "ca.crt"))
    ds = ct_dataset(head_hu())
    destination = f"{AE}@127.0.0.1:{listener.port}"
    mutual = pacs.tls_context(pki / "ca.crt", pki / "client.crt", pki / "client.key")
    assert pacs.store([ds], destination, "RESULTSCU", timeout_s=10, tls=mutual) == (True, "statuses 0x0000")
    assert pacs.store([ds], destination, "RESULTSCU", timeout_s=10)[0] is False   # plain TCP
    anonymous = pacs.tls_context(pki / "ca.crt")   # no client certificate: mutual TLS refuses
    assert pacs.store([ds], destination, "RESULTSCU", timeout_s=10, tls=anonymous)[0] is False
    assert redis.Redis.from_url(redis_url).llen(keys.SCORE_QUEUE) == 1
