"""One node end to end: DCMTK storescu → listener → Redis → scoring worker → alerts worker →
a real HTTP consumer, every process started from its Procfile line, as honcho would.

The model card carries the study rule `consecutive-2`: a normal study with one bright slice,
which a per-slice threshold would page on, must stay silent; a bleed seen on two neighbouring
slices alerts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.modelfactory import blood_detector
from pydicom.uid import generate_uid

from tests.services import (RedisServer, ServiceProcess, WebhookReceiver, free_port, metrics_text,
                            procfile)
from training.synthetic import make_study, to_bytes
from worker.alerts import verify

ROOT = Path(__file__).resolve().parents[2]
SECRET = "e2e-secret"


def write_study(folder: Path, subtypes: tuple[str, ...], index: int) -> tuple[str, list, set[str]]:
    """A phantom study as files; returns (study UID, slices, patient identifiers to scan for).
    Legacy site: the hand-weighted blood detector would also see calcifications as blood."""
    folder.mkdir(parents=True)
    slices = make_study(11, index, slices=(10, 12), subtypes=subtypes, variant="default",
                        site="legacy")
    for s in slices:
        (folder / f"{s.image_id}.dcm").write_bytes(to_bytes(s.dataset))
    ds = slices[0].dataset
    phi = {str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate)}
    return ds.StudyInstanceUID, slices, phi


def write_noisy_normal(folder: Path, index: int) -> tuple[str, list, int]:
    """A normal phantom study (new UIDs) in which ONE slice carries a blood-dense blob: an
    artefact the model scores far above the slice threshold. Returns (study UID, slices, the
    noisy slice's instance number)."""
    folder.mkdir(parents=True)
    bleeding = make_study(11, index, slices=(10, 12), subtypes=("intraparenchymal",), variant="default",
                          site="legacy")
    normal = make_study(11, index, slices=(10, 12), subtypes=("intraparenchymal",), variant="default",
                        site="legacy", bleeds=False)
    k = next(i for i, s in enumerate(bleeding) if s.labels["any"])
    normal[k].dataset.PixelData = bleeding[k].dataset.PixelData
    study, series = generate_uid(), generate_uid()
    for s in normal:
        s.dataset.StudyInstanceUID, s.dataset.SeriesInstanceUID = study, series
        s.dataset.SOPInstanceUID = s.dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        (folder / f"{s.image_id}.dcm").write_bytes(to_bytes(s.dataset))
    return study, normal, int(normal[k].dataset.InstanceNumber)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("node")
    redis_server = RedisServer(tmp / "redis", appendonly=True).start()
    receiver = WebhookReceiver()
    ports = {name: free_port() for name in ("dicom", "listener", "worker", "alerts")}
    env = {
        "ICH_REDIS_URL": redis_server.url, "ICH_MODEL_DIR": str(blood_detector(
            tmp / "models", study_rule={"name": "consecutive", "k": 2})),
        "ICH_DICOM_PORT": str(ports["dicom"]), "ICH_DICOM_HOST": "127.0.0.1",
        "ICH_LISTENER_METRICS_PORT": str(ports["listener"]),
        "ICH_WORKER_METRICS_PORT": str(ports["worker"]),
        "ICH_ALERTS_METRICS_PORT": str(ports["alerts"]),
        "ICH_WEBHOOK_URLS": receiver.url, "ICH_WEBHOOK_SECRET": SECRET,
        "ICH_STUDY_QUIET_S": "2", "TF_CPP_MIN_LOG_LEVEL": "2",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    procs = {name: ServiceProcess(["bash", "-c", f"exec {command}"], env, tmp / f"{name}.log",
                                  python=False)
             for name, command in procfile().items()}
    wait = {"listener": ports["dicom"], "worker": ports["worker"], "alerts": ports["alerts"]}
    for name, proc in procs.items():
        proc.start(wait_port=wait[name], timeout=120)
    yield {"procs": procs, "ports": ports, "receiver": receiver, "tmp": tmp, "redis": redis_server}
    for proc in procs.values():
        proc.stop()
    receiver.close()
    redis_server.stop()


def test_storescu_to_webhook(node):
    tmp, receiver, ports = node["tmp"], node["receiver"], node["ports"]
    positive, pos_slices, phi_pos = write_study(tmp / "positive", ("intraparenchymal",), 1)
    negative, neg_slices, phi_neg = write_study(tmp / "negative", (), 0)
    noisy, noisy_slices, noisy_instance = write_noisy_normal(tmp / "noisy", 1)
    assert any(s.labels["any"] for s in pos_slices) and not any(s.labels["any"] for s in neg_slices)
    sent_at = time.time()
    for folder in ("positive", "negative", "noisy"):
        result = subprocess.run(["storescu", "-aec", "ICHWATCH", "+sd", "127.0.0.1", str(ports["dicom"]),
                                 str(tmp / folder)], capture_output=True, text=True, timeout=120,
                                env={"TCP_NODELAY": "1", "PATH": os.environ["PATH"]})
        assert result.returncode == 0, result.stderr

    def alerts(study: str, kind: str) -> list[dict]:
        return [a for a in receiver.accepted() if a["study_instance_uid"] == study and a["kind"] == kind]

    receiver.wait_for(lambda: all(alerts(s, "study_summary") for s in (positive, negative, noisy)),
                      timeout=120)
    time.sleep(1.0)  # anything duplicated would arrive now
    first = alerts(positive, "first_positive")
    assert len(first) == 1 and alerts(negative, "first_positive") == []
    assert first[0]["study_rule"] == {"name": "consecutive", "k": 2}
    assert len(first[0]["positive_slices"]) >= 2
    # One slice far above the threshold, alone: a per-slice decision would have paged.
    summary = alerts(noisy, "study_summary")[0]
    assert alerts(noisy, "first_positive") == [] and not summary["positive"]["any"]
    assert summary["probabilities"]["any"] > 0.9 > summary["thresholds"]["any"] > summary["scores"]["any"]
    results = subprocess.run([sys.executable, "-m", "worker.results", noisy], capture_output=True,
                             text=True, timeout=60, env={**os.environ, "ICH_REDIS_URL": node["redis"].url})
    shown = json.loads(results.stdout)
    above = [r["instance_number"] for r in shown["slices"] if r["positive"]["any"]]
    assert above == [noisy_instance] and shown["decision"]["positive"]["any"] is False
    request = next(r for r in receiver.requests if json.loads(r["body"]) == first[0])
    assert verify(request["body"], request["headers"]["X-ICH-Signature"], SECRET,
                  request["headers"]["X-ICH-Timestamp"])
    assert first[0]["received_at"] >= sent_at - 1 and first[0]["latency_seconds"] < 60
    assert alerts(positive, "study_summary")[0]["positive"]["any"]
    assert not alerts(negative, "study_summary")[0]["positive"]["any"]
    assert len(receiver.requests) == 4  # one first_positive, three summaries, no retries

    total = len(pos_slices) + len(neg_slices) + len(noisy_slices)
    listener = metrics_text(ports["listener"])
    worker = metrics_text(ports["worker"])
    delivery = metrics_text(ports["alerts"])
    assert listener["ich_instances_received_total"] == listener["ich_instances_queued_total"] == total
    assert worker["ich_slices_scored_total"] == total
    assert worker['ich_alerts_total{kind="first_positive"}'] == 1
    assert delivery['ich_alerts_total{kind="study_summary"}'] == 3
    assert delivery['ich_webhook_deliveries_total{outcome="delivered"}'] == 4
    assert delivery["ich_time_to_alert_seconds_count"] == 1
    assert worker["ich_queue_depth"] == 0

    logs = "".join(p.log() for p in node["procs"].values())
    for value in phi_pos | phi_neg:
        assert value not in logs, "patient data in a log"


def test_an_enhanced_ct_study_alerts_as_its_classic_twin(node):
    """Issue 15 part 2: DCMTK storescu sends each phantom study twice, as classic slices and as
    one Enhanced CT Image object (new study UIDs; storescu's default contexts propose Enhanced
    CT, not Legacy Converted): the twin must decide alike, frame by frame, and name the frames."""
    from tests.ctfactory import enhanced_ct

    tmp, receiver, ports = node["tmp"], node["receiver"], node["ports"]
    studies = {}
    for name, subtypes, index in (("positive", ("intraparenchymal",), 3), ("negative", (), 2)):
        classic, slices, _ = write_study(tmp / f"classic-{name}", subtypes, index)
        twin_ds = [s.dataset for s in slices]
        multi = enhanced_ct(twin_ds, enhanced=True)
        multi.StudyInstanceUID = twin = generate_uid()
        (tmp / f"twin-{name}").mkdir()
        (tmp / f"twin-{name}" / "enhanced.dcm").write_bytes(to_bytes(multi))
        studies[name] = (classic, twin, len(slices))
        for folder in (f"classic-{name}", f"twin-{name}"):
            result = subprocess.run(["storescu", "-aec", "ICHWATCH", "+sd", "127.0.0.1",
                                     str(ports["dicom"]), str(tmp / folder)], capture_output=True,
                                    text=True, timeout=120,
                                    env={"TCP_NODELAY": "1", "PATH": os.environ["PATH"]})
            assert result.returncode == 0, result.stderr

    def alerts(study: str, kind: str) -> list[dict]:
        return [a for a in receiver.accepted() if a["study_instance_uid"] == study and a["kind"] == kind]

    every = [uid for classic, twin, _ in studies.values() for uid in (classic, twin)]
    receiver.wait_for(lambda: all(alerts(s, "study_summary") for s in every), timeout=120)
    for name, (classic, twin, n) in studies.items():
        a, b = alerts(classic, "study_summary")[0], alerts(twin, "study_summary")[0]
        assert a["positive"] == b["positive"] and a["positive"]["any"] == (name == "positive")
        assert a["slices_scored"] == b["slices_scored"] == n and b["complete"]
        assert b["scores"]["any"] == pytest.approx(a["scores"]["any"], abs=1e-4)
        assert len(alerts(twin, "first_positive")) == len(alerts(classic, "first_positive"))
        assert [s["instance_number"] for s in a["positive_slices"]] == \
               [s["frame_number"] for s in b["positive_slices"]]

