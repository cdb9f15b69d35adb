"""Burst (issue 7, `make soak`): 5,000 slices from 4 concurrent senders as fast as they can push
while no worker drains the queue, so the queue limit forces back-pressure (0xA700); then the
worker scores the backlog. Nothing acknowledged may be lost; memory stays bounded."""
from __future__ import annotations

import multiprocessing
import time

import pytest
from pydicom.uid import generate_uid

from dicom_listener.send import responses_stay_queued
from tests.ctfactory import ct_dataset, lesion_hu
from tests.modelfactory import blood_detector
from tests.pipeline import Pipeline, ScriptedReceiver
from tests.services import RedisServer, ServiceProcess, free_port, memory_mib

pytestmark = pytest.mark.soak
SLICES, SENDERS, MAX_QUEUE = 5000, 4, 1500


def _send(args: tuple) -> dict[str, int]:
    """One sender; like a PACS it re-associates after an abort. A C-STORE with no response
    gets status -1: the sender cannot know whether it was stored."""
    port, study, first, count = args
    from pynetdicom import AE

    scu = AE(ae_title=f"BURST{first}")
    scu.dimse_timeout = 60
    template = ct_dataset(lesion_hu(128, seed=first, bleed=False))
    scu.add_requested_context(template.SOPClassUID, template.file_meta.TransferSyntaxUID)
    assoc = None
    out = {}
    for n in range(first, first + count):
        if assoc is None or not assoc.is_established:
            assoc = scu.associate("127.0.0.1", port, ae_title="ICHWATCH")
            assert assoc.is_established, f"sender {first}: association not established"
            responses_stay_queued(assoc)
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        template.StudyInstanceUID, template.InstanceNumber = study, n
        out[template.SOPInstanceUID] = assoc.send_c_store(template).get("Status", -1)
    assoc.release()
    return out


def test_burst_of_5000_slices_loses_nothing(tmp_path):
    redis_server = RedisServer(tmp_path / "redis", appendonly=True).start()
    receiver = ScriptedReceiver()
    p = Pipeline(tmp_path, redis_server, receiver, blood_detector(tmp_path / "models"),
                 ICH_BATCH_MAX="32", ICH_STUDY_QUIET_S="3600")
    p.alerts.start(wait_port=p.alert_metrics, timeout=120)  # scoring starts after the burst:
    dicom = free_port()
    listener = ServiceProcess(["-m", "dicom_listener"], {
        "ICH_REDIS_URL": redis_server.url, "ICH_DICOM_PORT": str(dicom), "ICH_DICOM_HOST": "127.0.0.1",
        "ICH_LISTENER_METRICS_PORT": "0", "ICH_MAX_QUEUE": str(MAX_QUEUE)},
        tmp_path / "listener.log").start(wait_port=dicom)
    study = generate_uid()
    try:
        started = time.monotonic()
        share = SLICES // SENDERS
        with multiprocessing.get_context("spawn").Pool(SENDERS) as pool:
            parts = pool.map(_send, [(dicom, study, i * share, share) for i in range(SENDERS)])
        sent_s = time.monotonic() - started  # the queue filled up to ICH_MAX_QUEUE meanwhile
        p.scoring.start(wait_port=p.score_metrics, timeout=120)
        statuses = {uid: s for part in parts for uid, s in part.items()}
        stored = {uid for uid, s in statuses.items() if s == 0x0000}
        refused = {uid for uid, s in statuses.items() if s == 0xA700}
        unknown = {uid for uid, s in statuses.items() if s == -1}  # no response: sender retries
        assert len(statuses) == SLICES and stored | refused | unknown == set(statuses)
        assert MAX_QUEUE - len(unknown) <= len(stored) <= MAX_QUEUE, "back-pressure failed"
        deadline = time.monotonic() + 600
        while not set(p.results(study)) >= stored:
            assert time.monotonic() < deadline, "acknowledged slices were not all scored"
            time.sleep(1)
        drained_s = time.monotonic() - started
        scored = set(p.results(study))
        assert stored <= scored <= stored | unknown, "lost or half-stored slices"
        print(f"\nburst: {SLICES} sent by {SENDERS} senders in {sent_s:.1f} s "
              f"({SLICES / sent_s:.0f}/s); stored {len(stored)}, refused 0xA700 {len(refused)} "
              f"(ICH_MAX_QUEUE {MAX_QUEUE}), no response {len(unknown)}; scored {len(p.results(study))}, lost 0; all scored after "
              f"{drained_s:.0f} s; peak RSS listener {memory_mib(listener.proc.pid, 'VmHWM'):.0f} MiB, "
              f"scoring worker {memory_mib(p.scoring.proc.pid, 'VmHWM'):.0f} MiB")
    finally:
        listener.stop()
        p.stop()
        receiver.close()
        redis_server.stop()
