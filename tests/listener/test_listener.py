"""The DICOM node with real peers (DCMTK echoscu/storescu, pynetdicom SCU) and a real Redis."""
from __future__ import annotations

import subprocess

import pydicom
import pynetdicom.association
import pytest
import redis
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid
from pynetdicom import AE as SCU
from pynetdicom.sop_class import BasicTextSRStorage, MRImageStorage

from dicom_listener.send import responses_stay_queued
from ich import keys
from ich.queue import SCORE_TASK
from tests.ctfactory import ct_dataset, enhanced_ct, head_hu, to_bytes
from tests.listener.conftest import AE, queued_messages
from tests.services import RedisServer

PHI = {"PatientName": "DOE^JANE^Q", "PatientID": "MRN99887766", "PatientBirthDate": "19450317"}


def ct_slice(n: int, study: str, series: str, size: int = 64) -> Dataset:
    ds = ct_dataset(head_hu(size, seed=n))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.InstanceNumber = n
    ds.ImagePositionPatient = [-100.0, -100.0, 5.0 * n]
    ds.AccessionNumber = "ACC0042"
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    return ds


def associate(port: int, datasets: list[Dataset], calling: str = "TESTSCU"):
    """An established association to the listener, proposing the contexts of `datasets`."""
    scu = SCU(ae_title=calling)
    for ds in datasets:
        scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = scu.associate("127.0.0.1", port, ae_title=AE)
    assert assoc.is_established
    responses_stay_queued(assoc)   # pynetdicom's requestor race (dicom_listener/send.py)
    return assoc


def statuses(port: int, datasets: list[Dataset], calling: str = "TESTSCU") -> list[int]:
    assoc = associate(port, datasets, calling)
    try:
        return [assoc.send_c_store(ds).get("Status", -1) for ds in datasets]
    finally:
        assoc.release()


def storescu(port: int, files, *extra: str, calling: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", calling, "-aec", AE, *extra, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=60,
                          env={"TCP_NODELAY": "1"})


def test_echoscu_verification(listener):
    result = subprocess.run(["echoscu", "-aec", AE, "127.0.0.1", str(listener.port)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_storescu_queues_every_slice_once_with_metadata(listener, redis_url, tmp_path):
    study, series = generate_uid(), generate_uid()
    sent: dict[str, Dataset] = {}
    for n in range(1, 6):
        ds = ct_slice(n, study, series)
        if n == 4:
            ds.compress(RLELossless)
        if n == 5:
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(to_bytes(ds))
        sent[ds.SOPInstanceUID] = ds
    # DCMTK proposes one compressed syntax per run: -xr RLE, -xv JPEG 2000 lossless.
    for files, option in ((["1", "2", "3"], []), (["4"], ["-xr"]), (["5"], ["-xv"])):
        result = storescu(listener.port, [tmp_path / f"{n}.dcm" for n in files], *option)
        assert result.returncode == 0, result.stderr

    client = redis.Redis.from_url(redis_url)
    messages = queued_messages(client)
    assert len(messages) == 5
    assert {m["kwargs"]["sop_instance_uid"] for m in messages} == set(sent)
    for m in messages:
        meta, ds = m["kwargs"], sent[m["kwargs"]["sop_instance_uid"]]
        assert m["headers"]["task"] == SCORE_TASK and m["headers"]["id"] == meta["token"]
        assert meta["study_instance_uid"] == study and meta["series_instance_uid"] == series
        assert meta["instance_number"] == ds.InstanceNumber
        assert meta["slice_position"] == pytest.approx(5.0 * ds.InstanceNumber)
        assert meta["accession_number"] == "ACC0042" and meta["calling_ae"] == "STORESCU"
        assert not set(PHI.values()) & set(map(str, meta.values()))
        stored = client.get(keys.slice_bytes(meta["token"]))
        assert 0 < client.ttl(keys.slice_bytes(meta["token"])) <= 86400
        got = pydicom.dcmread(pydicom.filebase.DicomBytesIO(stored))
        assert got.SOPInstanceUID == ds.SOPInstanceUID
        assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID  # as received
        assert got.PixelData == ds.PixelData
    m = listener.metrics()
    assert m["ich_instances_received_total"] == 5 and m["ich_instances_queued_total"] == 5
    assert m["ich_queue_depth"] == 5
    assert m['ich_associations_total{outcome="accepted"}'] == 3
    assert m["ich_store_handler_seconds_count"] == 5


def test_message_is_a_celery_task_a_kombu_consumer_reads(listener, redis_url):
    from kombu import Connection

    ds = ct_slice(1, generate_uid(), generate_uid())
    assert statuses(listener.port, [ds]) == [0]
    with Connection(redis_url) as conn:
        queue = conn.SimpleQueue(keys.SCORE_QUEUE)
        message = queue.get(timeout=5)
        args, kwargs, embed = message.decode()
        assert message.headers["task"] == SCORE_TASK and args == []
        assert kwargs["sop_instance_uid"] == ds.SOPInstanceUID
        assert message.delivery_info["routing_key"] == keys.SCORE_QUEUE
        message.ack()
        queue.close()


def test_non_ct_instances_are_ignored_with_success(listener, redis_url):
    mr = ct_dataset(head_hu(), modality="MR")
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    sr = Dataset()
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    sr.SOPClassUID, sr.SOPInstanceUID = BasicTextSRStorage, generate_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.Modality = generate_uid(), generate_uid(), "SR"
    assert statuses(listener.port, [mr, sr]) == [0, 0]
    assert redis.Redis.from_url(redis_url).llen(keys.SCORE_QUEUE) == 0
    m = listener.metrics()
    assert m['ich_instances_ignored_total{reason="not_ct"}'] == 1
    assert m['ich_instances_ignored_total{reason="non_image"}'] == 1


def test_a_legacy_converted_enhanced_ct_is_queued_whole(listener, redis_url):
    """Issue 15 part 2: one message per multi-frame object (the worker splits the frames)."""
    study, series = generate_uid(), generate_uid()
    multi = enhanced_ct([ct_slice(n, study, series) for n in range(1, 5)])
    assert statuses(listener.port, [multi]) == [0x0000]
    queued, = queued_messages(redis.Redis.from_url(redis_url))
    assert queued["kwargs"]["sop_instance_uid"] == multi.SOPInstanceUID
    assert queued["kwargs"]["study_instance_uid"] == study
    assert listener.metrics()["ich_instances_queued_total"] == 1


def test_bad_instances_fail_alone_and_neighbours_succeed(listener, redis_url, monkeypatch):
    study, series = generate_uid(), generate_uid()
    good1, good2 = ct_slice(1, study, series), ct_slice(2, study, series)
    no_pixels = ct_slice(3, study, series)
    del no_pixels.PixelData
    no_series = ct_slice(4, study, series)
    del no_series.SeriesInstanceUID
    truncated = ct_slice(5, study, series)
    truncated.PixelData = truncated.PixelData[:100]
    garbage = ct_slice(6, study, series)

    real_encode = pynetdicom.association.encode

    def encode(ds, *args):  # the peer sends bytes that are not a data set at all
        return b"\x13\x37" * 64 if ds is garbage else real_encode(ds, *args)

    monkeypatch.setattr(pynetdicom.association, "encode", encode)
    got = statuses(listener.port, [good1, no_pixels, garbage, no_series, truncated, good2])
    assert got == [0x0000, 0xA900, 0xC210, 0xA900, 0xC210, 0x0000]
    queued = {m["kwargs"]["sop_instance_uid"] for m in queued_messages(redis.Redis.from_url(redis_url))}
    assert queued == {good1.SOPInstanceUID, good2.SOPInstanceUID}
    m = listener.metrics()
    for reason in ("no_pixel_data", "undecodable", "missing_uid", "truncated"):
        assert m[f'ich_instances_rejected_total{{reason="{reason}"}}'] == 1, reason


def test_queue_limit_answers_out_of_resources(listener_factory, redis_url):
    listener = listener_factory(ICH_MAX_QUEUE="2")
    study, series = generate_uid(), generate_uid()
    got = statuses(listener.port, [ct_slice(n, study, series) for n in range(4)])
    assert got == [0, 0, 0xA700, 0xA700]
    client = redis.Redis.from_url(redis_url)
    assert client.llen(keys.SCORE_QUEUE) == 2
    stored = list(client.scan_iter(keys.slice_bytes("*")))   # refused slices leave no bytes
    assert len(stored) == 2 and all(client.ttl(k) > 0 for k in stored)
    assert listener.metrics()['ich_instances_rejected_total{reason="queue_full"}'] == 2


def test_redis_down_answers_out_of_resources_then_recovers(listener_factory, tmp_path):
    private = RedisServer(tmp_path / "redis").start()
    try:
        listener = listener_factory(redis=private.url)
        study, series = generate_uid(), generate_uid()
        assert statuses(listener.port, [ct_slice(1, study, series)]) == [0]
        private.stop()
        assert statuses(listener.port, [ct_slice(2, study, series)]) == [0xA700]
        private.start()  # same port, empty (no persistence in this test): nothing half-stored
        assert private.client().dbsize() == 0
        assert statuses(listener.port, [ct_slice(3, study, series)]) == [0]
        assert private.client().llen(keys.SCORE_QUEUE) == 1
        assert "Redis unavailable" in listener.log()
    finally:
        private.stop()


def test_calling_ae_allow_list(listener_factory):
    listener = listener_factory(ICH_ALLOWED_CALLING_AETS="CT_SCANNER1,PACS")
    echo = ["echoscu", "-aec", AE, "127.0.0.1", str(listener.port)]
    assert subprocess.run(echo + ["-aet", "INTRUDER"], capture_output=True, timeout=30).returncode != 0
    assert subprocess.run(echo + ["-aet", "CT_SCANNER1"], capture_output=True, timeout=30).returncode == 0
    bad_called = ["echoscu", "-aet", "PACS", "-aec", "NOTUS", "127.0.0.1", str(listener.port)]
    assert subprocess.run(bad_called, capture_output=True, timeout=30).returncode != 0
    m = listener.metrics()
    assert m['ich_associations_total{outcome="rejected"}'] == 2
    assert m['ich_associations_total{outcome="accepted"}'] == 1


def test_logs_carry_counts_and_no_patient_data(listener, tmp_path):
    study, series = generate_uid(), generate_uid()
    files = []
    for n in range(3):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(to_bytes(ct_slice(n, study, series)))
        files.append(path)
    assert storescu(listener.port, files).returncode == 0
    listener.stop()
    log = listener.log()
    assert "received 3, queued 3, ignored 0, rejected 0" in log
    for value in PHI.values():
        assert value not in log and value.replace("^", " ") not in log


def test_listener_processes_share_one_port(listener_factory):
    """SO_REUSEPORT: the way to use more than one core for concurrent senders."""
    first = listener_factory()
    second = listener_factory(port=first.port)
    for _ in range(16):
        result = subprocess.run(["echoscu", "-aec", AE, "127.0.0.1", str(first.port)],
                                capture_output=True, timeout=30)
        assert result.returncode == 0
    accepted = [p.metrics().get('ich_associations_total{outcome="accepted"}', 0) for p in (first, second)]
    assert sum(accepted) == 16 and min(accepted) > 0, accepted
