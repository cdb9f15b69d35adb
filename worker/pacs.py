"""Results back to PACS (issue 15): what the radiologist sees in the viewer, inside the study.

Two objects per result, each a new series of the scanned study so any viewer sorts them next to
the original:

- a **Comprehensive SR** holding a TID 1500 Measurement Report (highdicom): one measurement
  group per label with the finding present/absent (SCT 52101004 / 272519000), the study score
  and threshold, the algorithm (name, model version) and references to the key source slices;
- for a positive study, a **key-image Secondary Capture** of its most suspicious slice in the
  brain window (L40/W80), with a caption burned into the pixels ("AI triage - not for diagnostic
  use", the label and probability): burned in, so no viewer can show the image without it.

UIDs are derived from (study, model version, kind), so a retried or redelivered send stores the
same instances again (a PACS keeps one), and a later result of the same study is a new instance
whose SR names the earlier one in Predecessor Documents (PS3.3 C.17.2.3).

The patient and study modules come from the header the scoring worker kept for the study
(`ich:study:<uid>:evidence`, no pixel data); nothing here is logged.
"""
from __future__ import annotations

import io
import json
import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian

from ich.labels import ANY, LABELS
from ich.settings import parse_destination

MANUFACTURER = "ICH Watch"
ALGORITHM = "ICH Watch intracranial hemorrhage triage"
CAPTION = "AI triage - not for diagnostic use"
SR_SERIES_NUMBER, KEY_SERIES_NUMBER = 9901, 9902
_NAMESPACE = uuid.UUID("0c3a4f5e-61b2-4d8e-9f70-3b1e2d4c5a69")

#: The finding each label reports (SNOMED CT).
FINDINGS = {
    "epidural": hd.sr.CodedConcept("68752002", "SCT", "Epidural hemorrhage"),
    "intraparenchymal": hd.sr.CodedConcept("274100004", "SCT", "Cerebral hemorrhage"),
    "intraventricular": hd.sr.CodedConcept("230706003", "SCT", "Intraventricular hemorrhage"),
    "subarachnoid": hd.sr.CodedConcept("21454007", "SCT", "Subarachnoid hemorrhage"),
    "subdural": hd.sr.CodedConcept("35486000", "SCT", "Subdural hemorrhage"),
    ANY: hd.sr.CodedConcept("1386000", "SCT", "Intracranial hemorrhage"),
}
PROBABILITY = hd.sr.CodedConcept("PROB", "99ICHW", "Study score (probability)")
THRESHOLD = hd.sr.CodedConcept("THRESH", "99ICHW", "Decision threshold")
CT_HEAD = hd.sr.CodedConcept("24725-4", "LN", "CT Head")


def uid(*parts: str) -> str:
    """A stable DICOM UID (2.25 form, PS3.5 B.2) for the same inputs."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(parts)).int}"


@dataclass(frozen=True)
class KeyImage:
    """The study's most suspicious slice, as the scoring worker kept it (brain window, uint8)."""

    pixels: np.ndarray
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    frame_number: int | None
    probability: float

    @classmethod
    def from_evidence(cls, evidence: dict[str, bytes]) -> "KeyImage | None":
        if "key_pixels" not in evidence:
            return None
        rows, cols = (int(v) for v in evidence["key_shape"].decode().split("x"))
        return cls(np.frombuffer(evidence["key_pixels"], np.uint8).reshape(rows, cols),
                   evidence["key_sop_instance_uid"].decode(), evidence["key_sop_class_uid"].decode(),
                   evidence["key_series_instance_uid"].decode(),
                   int(evidence["key_frame"]) or None, float(evidence["key_any"]))


@dataclass(frozen=True)
class Sent:
    """What a destination was last sent for a study: enough to skip an unchanged summary and
    to name the earlier SR when a changed one supersedes it."""

    digest: str
    kind: str
    sr_sop_instance_uid: str
    sr_series_instance_uid: str


def digest(alert: dict) -> str:
    """What a result says, independent of when it was built: verdict, scores, completeness
    and key slices. Equal digests: nothing new to tell the PACS."""
    said = {"positive": alert["positive"], "complete": alert.get("complete", True),
            "scores": {k: round(float(v), 3) for k, v in alert["scores"].items()},
            "slices": sorted((s["sop_instance_uid"], s.get("frame_number") or 0)
                             for s in alert.get("positive_slices", []))}
    return uuid.uuid5(_NAMESPACE, json.dumps(said, sort_keys=True)).hex


#: Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that the
#: SR and the key image copy from the scanned slice. A slice may lack them (a sender that
#: strips them); they are then written empty, as Type 2 allows, instead of failing the result.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def build(alert: dict, evidence: dict[str, bytes], previous: Sent | None) -> list[Dataset]:
    """The objects to store for `alert`: its SR and, when positive with a key slice, the key
    image. Raises KeyError without a kept header (a study scored before results were on)."""
    header = pydicom.dcmread(io.BytesIO(evidence["header"]))
    for keyword in TYPE2_COPIED:
        if keyword not in header:
            setattr(header, keyword, "")
    earlier = None
    if previous is not None:
        earlier = _reference(header, previous.sr_sop_instance_uid, ComprehensiveSRStorage,
                             previous.sr_series_instance_uid)
    out = [build_sr(alert, header, earlier)]
    key = KeyImage.from_evidence(evidence)
    if alert["positive"][ANY] and key is not None:
        out.append(build_key_image(alert, header, key))
    return out


def tls_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Client TLS (PS3.15 B.1, TLS ≥ 1.2): the PACS must present a certificate from `ca`, and
    the host name or IP of the destination must match it; `cert`/`key` make it mutual."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def store(datasets: list[Dataset], destination: str, ae_title: str, timeout_s: float = 30.0,
          tls: ssl.SSLContext | None = None) -> tuple[bool, str]:
    """C-STORE every dataset to `destination` (AET@host:port) in one association, over TLS
    when `tls` is given. Returns (stored, detail); detail is safe for logs (no UIDs)."""
    from pynetdicom import AE

    aet, host, port = parse_destination(destination)
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 10.0)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate(host, port, ae_title=aet, tls_args=(tls, host) if tls else None)
    if not assoc.is_established:
        return False, "association rejected, aborted or not answered"
    try:
        statuses = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    ok = all(s in (0x0000, 0xB000, 0xB007, 0xB006) for s in statuses)   # PS3.4 B.2.3: warnings store
    return ok, "statuses " + ",".join(f"0x{s & 0xFFFF:04X}" for s in statuses)


def build_sr(alert: dict, header: Dataset, previous: Dataset | None = None) -> Dataset:
    """The TID 1500 report of `alert` (first_positive or study_summary)."""
    study, version, kind = alert["study_instance_uid"], alert["model_version"], alert["kind"]
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM, version=version)
    context = hd.sr.ObservationContext(
        observer_person_context=None,
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=uid("device", MANUFACTURER), name=MANUFACTURER, model_name=version)))
    evidence = _evidence(alert, header)
    sources = [hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=ds.SOPClassUID, referenced_sop_instance_uid=ds.SOPInstanceUID,
        referenced_frame_numbers=frames or None) for ds, frames in evidence]
    groups = []
    for label in LABELS:
        present = bool(alert["positive"][label])
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=uid(study, version, kind, label),
                                                         identifier=f"ICH {label}"),
            algorithm_id=algorithm,
            finding_type=FINDINGS[label],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                FINDINGS[label], codes.SCT.Present if present else codes.SCT.Absent)],
            measurements=[
                hd.sr.Measurement(PROBABILITY, float(alert["scores"][label]), codes.UCUM.NoUnits,
                                  algorithm_id=algorithm),
                hd.sr.Measurement(THRESHOLD, float(alert["thresholds"][label]), codes.UCUM.NoUnits,
                                  algorithm_id=algorithm)],
            source_images=sources if present and sources else None))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=CT_HEAD,
                                     imaging_measurements=groups)
    sr = hd.sr.ComprehensiveSR(
        evidence=[ds for ds, _ in evidence] or [_reference(header, header.SOPInstanceUID,
                                                           header.SOPClassUID, header.SeriesInstanceUID)],
        content=report[0],
        series_instance_uid=uid(study, version, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uid(study, version, kind, "sr"),
        instance_number=1 if kind == "first_positive" else 2,
        manufacturer=MANUFACTURER,
        is_complete=kind == "study_summary" and bool(alert.get("complete", True)),
        previous_versions=[previous] if previous is not None else None,
        series_description="ICH Watch AI triage (not for diagnostic use)",
    )
    scheme = Dataset()   # our private codes are declared (PS3.3 C.12.1.1.4)
    scheme.CodingSchemeDesignator, scheme.CodingSchemeName = "99ICHW", "ICH Watch local codes"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def build_key_image(alert: dict, header: Dataset, key: KeyImage) -> Dataset:
    """The key-image Secondary Capture: `key` with the caption burned in."""
    study, version, kind = alert["study_instance_uid"], alert["model_version"], alert["kind"]
    label = max((lb for lb in LABELS if lb != ANY), key=lambda lb: alert["scores"][lb])
    pixels = burn_caption(key.pixels, [CAPTION, f"{label} {alert['scores'][label]:.2f}, "
                                                f"any {key.probability:.2f}, model {version}"])
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header, pixel_array=pixels, photometric_interpretation="MONOCHROME2",
        bits_allocated=8, coordinate_system="PATIENT",
        series_instance_uid=uid(study, version, "key-series"), series_number=KEY_SERIES_NUMBER,
        sop_instance_uid=uid(study, version, kind, "key"),
        instance_number=1 if kind == "first_positive" else 2,
        manufacturer=MANUFACTURER, patient_orientation=("L", "P"),
        series_description="ICH Watch key image (not for diagnostic use)")
    image.BurnedInAnnotation, image.ImageComments = "YES", CAPTION
    image.Laterality = ""   # PS3.3 C.7.3.1 Type 2C: the head is not a paired part; present, empty
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = key.sop_class_uid, key.sop_instance_uid
    if key.frame_number:
        source.ReferencedFrameNumber = key.frame_number
    image.SourceImageSequence = [source]
    return image


def burn_caption(pixels: np.ndarray, lines: list[str]) -> np.ndarray:
    """White text on a black band at the top (PIL's built-in font; no font files needed)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    band = 4 + 12 * len(lines)
    draw.rectangle([0, 0, img.width, band], fill=0)
    for i, line in enumerate(lines):
        draw.text((4, 2 + 12 * i), line, fill=255, font=font)
    return np.asarray(img)


def _evidence(alert: dict, header: Dataset) -> list[tuple[Dataset, list[int]]]:
    """The key slices of the alert as minimal referenced datasets (one per SOP instance, with
    the frames named for a multi-frame one)."""
    by_instance: dict[str, list[int]] = {}
    for s in alert.get("positive_slices", []):
        frames = by_instance.setdefault(s["sop_instance_uid"], [])
        if s.get("frame_number"):
            frames.append(int(s["frame_number"]))
    series = {s["sop_instance_uid"]: s.get("series_instance_uid") or alert["series_instance_uid"]
              for s in alert.get("positive_slices", [])}
    classes = {s["sop_instance_uid"]: s.get("sop_class_uid") or header.SOPClassUID
               for s in alert.get("positive_slices", [])}
    return [(_reference(header, sop, classes[sop], series[sop]), frames)
            for sop, frames in by_instance.items()]


def _reference(header: Dataset, sop_instance_uid: str, sop_class_uid: str, series_uid: str) -> Dataset:
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if keyword in header:
            setattr(ds, keyword, header.get(keyword))
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = sop_class_uid, sop_instance_uid, series_uid
    return ds

