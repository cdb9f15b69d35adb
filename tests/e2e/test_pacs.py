"""Results back to PACS (issue 15 part 1), with Orthanc as the receiving PACS: the study's
slices are already in Orthanc (as a modality would have sent them), ICH Watch scores them and
stores its SR and key image into the same study. The PACS is down when the results are first
due and gets them once it is back; a destination that never answers ends in the dead letters.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from ich import keys
from ich.queue import SliceMeta
from tests.modelfactory import blood_detector
from tests.pipeline import Pipeline, ScriptedReceiver
from tests.services import RedisServer, ServiceProcess, free_port, wait_for_port
from training.synthetic import make_study, to_bytes



class Orthanc(ServiceProcess):
    """A private Orthanc: DICOM and REST on free ports, storage in the test's folder."""

    def __init__(self, folder: Path, dicom_port: int) -> None:
        self.dicom_port, self.http_port = dicom_port, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        config = {"Name": "test-pacs", "DicomAet": "PACS", "DicomPort": dicom_port,
                  "HttpPort": self.http_port, "StorageDirectory": str(folder / "storage"),
                  "IndexDirectory": str(folder / "index"), "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
                  "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "Plugins": []}
        (folder / "orthanc.json").write_text(json.dumps(config))
        super().__init__(["Orthanc", str(folder / "orthanc.json")], {}, folder / "orthanc.log",
                         python=False)

    def start(self) -> "Orthanc":
        if not shutil.which("Orthanc"):
            raise RuntimeError("Orthanc is not installed: run scripts/system-deps (Debian: orthanc)")
        super().start(wait_port=self.http_port, timeout=60)
        wait_for_port(self.dicom_port, timeout=30)
        return self

    def get(self, path: str):
        return requests.get(f"http://127.0.0.1:{self.http_port}{path}", timeout=10)

    def instances(self, study_uid: str) -> list[dict]:
        found = requests.post(f"http://127.0.0.1:{self.http_port}/tools/find", timeout=10,
                              json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).json()
        if not found:
            return []
        out = []
        for instance in self.get(f"/studies/{found[0]}/instances").json():
            tags = self.get(f"/instances/{instance['ID']}/simplified-tags").json()
            out.append({"id": instance["ID"], **tags})
        return out


def write_study(folder: Path, index: int, subtypes: tuple[str, ...]):
    folder.mkdir(parents=True)
    slices = make_study(11, index, slices=(10, 12), subtypes=subtypes, variant="default", site="legacy")
    for s in slices:
        (folder / f"{s.image_id}.dcm").write_bytes(to_bytes(s.dataset))
    return slices


def test_sr_and_key_image_reach_the_pacs_once_it_is_back(tmp_path):
    pacs_port, dead_port = free_port(), free_port()
    redis_server = RedisServer(tmp_path / "redis").start()
    receiver = ScriptedReceiver()
    p = Pipeline(tmp_path, redis_server, receiver, blood_detector(tmp_path / "models"),
                 ICH_RESULT_DESTINATIONS=f"PACS@127.0.0.1:{pacs_port},GONE@127.0.0.1:{dead_port}",
                 ICH_STUDY_QUIET_S="2", ICH_WEBHOOK_BACKOFF_S="1", ICH_WEBHOOK_MAX_ATTEMPTS="6").start()
    orthanc = Orthanc(tmp_path / "orthanc", pacs_port)
    try:
        studies = {"positive": write_study(tmp_path / "positive", 1, ("intraparenchymal",)),
                   "negative": write_study(tmp_path / "negative", 0, ())}
        for slices in studies.values():
            for s in slices:   # queued exactly as the listener queues a received slice
                ds = s.dataset
                p.send(to_bytes(ds), SliceMeta(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                               instance_number=int(ds.InstanceNumber),
                                               slice_position=float(ds.ImagePositionPatient[2])))
        uid = {name: slices[0].dataset.StudyInstanceUID for name, slices in studies.items()}
        receiver.wait_for(lambda: all(p.alerts_for(u, "study_summary") for u in uid.values()), 90)
        time.sleep(3.0)   # the PACS is down: the first attempts fail and are retried
        orthanc.start()
        for name in studies:   # the modality's own slices, as the PACS holds them
            sent = subprocess.run(["storescu", "-aec", "PACS", "+sd", "127.0.0.1", str(pacs_port),
                                   str(tmp_path / name)], capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stderr

        def ours(name: str) -> list[dict]:
            return [i for i in orthanc.instances(uid[name])
                    if i["SOPClassUID"] in (ComprehensiveSRStorage, SecondaryCaptureImageStorage)]

        # Three results are due at PACS (the positive study's first_positive and summary, the
        # negative study's summary); each ends stored or "unchanged". Retries back off up to
        # 16 s here, so wait for all three rather than for the first object to appear.
        def settled() -> float:
            counts = p.metrics("alerts")
            return sum(counts.get(f'ich_dicom_results_total{{outcome="{o}"}}', 0)
                       for o in ("stored", "unchanged"))

        deadline = time.monotonic() + 120
        while settled() < 3 and time.monotonic() < deadline:
            time.sleep(1.0)
        assert settled() >= 3, "not every result reached the PACS once it was back"
        time.sleep(3.0)   # anything sent twice would arrive now
        positive, negative = ours("positive"), ours("negative")
        classes = sorted(i["SOPClassUID"] for i in positive)
        assert SecondaryCaptureImageStorage in classes and ComprehensiveSRStorage in classes
        assert [i["SOPClassUID"] for i in negative] == [ComprehensiveSRStorage], "a key image for a normal study"
        originals = {s.dataset.SOPInstanceUID for s in studies["positive"]}
        everything = orthanc.instances(uid["positive"])
        assert originals <= {i["SOPInstanceUID"] for i in everything}
        assert len({i["PatientID"] for i in everything}) == 1, "results filed under another patient"
        srs = sorted((i for i in positive if i["SOPClassUID"] == ComprehensiveSRStorage),
                     key=lambda i: int(i["InstanceNumber"]))
        assert len(srs) == len({i["SOPInstanceUID"] for i in srs}) <= 2   # first_positive, summary
        # Once: every store ICH Watch made is a distinct SR in the PACS (the UIDs are stable, so
        # Orthanc would keep one copy of a result sent twice; the counter would not).
        stored = p.metrics("alerts")['ich_dicom_results_total{outcome="stored"}']
        assert stored == len(srs) + 1, f"{stored:.0f} stores for {len(srs) + 1} results"
        # The SR references key slices that are in the study, and says the bleed is present.
        sr = pydicom_of(orthanc, srs[-1]["id"])
        referenced = {r.ReferencedSOPInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence
                      for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
        assert referenced and referenced <= originals
        assert "Present" in str(sr.ContentSequence)
        if len(srs) == 2:   # a later result supersedes the earlier one
            assert sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0] \
                .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == srs[0]["SOPInstanceUID"]
        else:               # the summary said what the first_positive said: not sent again
            assert p.metrics("alerts")['ich_dicom_results_total{outcome="unchanged"}'] >= 1
        # dciodvfy (dicom3tools) finds no error in what we stored.
        for instance in positive + negative:
            path = tmp_path / f"{instance['id']}.dcm"
            path.write_bytes(orthanc.get(f"/instances/{instance['id']}/file").content)
            checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            errors = [line for line in (checked.stdout + checked.stderr).splitlines()
                      if line.startswith("Error")]
            assert not errors, f"{instance['SOPClassUID']}: {errors}"
        # The destination that never answers: dead letters, with a counter.
        deadline = time.monotonic() + 60
        while p.metrics("alerts").get('ich_dicom_results_total{outcome="dead_letter"}', 0) < 3:
            assert time.monotonic() < deadline, "the unreachable destination was never dead-lettered"
            time.sleep(1.0)
        dead = [json.loads(r) for r in p.client.lrange(keys.DEAD_LETTERS, 0, -1)]
        assert {d["destination"] for d in dead} == {1} and len(dead) == 3
        listed = subprocess.run([sys.executable, "-m", "worker.deadletters", "list"], capture_output=True,
                                text=True, env={**os.environ, "ICH_REDIS_URL": redis_server.url})
        assert listed.stdout.count('"destination": 1') == 3
    finally:
        orthanc.stop()
        p.stop()
        receiver.close()
        redis_server.stop()


def pydicom_of(orthanc: Orthanc, instance_id: str):
    import io

    import pydicom

    return pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{instance_id}/file").content))
