"""What to do with one received instance: queue it, ignore it (Success), or refuse it.

Pure functions of the dataset header, so the rules are testable without a network. Statuses
are PS3.4 Annex B.2.3 (Storage Service Class, C-STORE response status values).
"""
from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

from ich.imaging import MAX_FRAMES, SliceError, check_slice
from ich.queue import SliceMeta

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700        # Refused: Out of Resources — queue full or Redis unavailable
DATASET_MISMATCH = 0xA900        # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC210       # Error: Cannot understand — the data set cannot be parsed

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
#: Multi-frame CT objects: queued whole; the worker scores each frame as a slice (issue 15).
MULTI_FRAME_CT = frozenset({
    UID("1.2.840.10008.5.1.4.1.1.2.1"),  # Enhanced CT Image Storage
    UID("1.2.840.10008.5.1.4.1.1.2.2"),  # Legacy Converted Enhanced CT Image Storage
})
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


@dataclass(frozen=True)
class Decision:
    action: str           # "queue" | "ignore" | "reject"
    reason: str = ""      # metric label and log reason: a small fixed vocabulary, never data
    status: int = SUCCESS


QUEUE = Decision("queue")


def classify(ds: Dataset, sop_class_uid: str, sop_instance_uid: str) -> Decision:
    """Decide from the header alone; pixels are the worker's business. pydicom parses
    lazily, so a malformed element may raise here: the caller answers that with 0xC210."""
    if "SOPClassUID" not in ds and "SOPInstanceUID" not in ds:
        return Decision("reject", "undecodable", CANNOT_UNDERSTAND)
    if sop_class_uid != CT_IMAGE_STORAGE and sop_class_uid not in MULTI_FRAME_CT:
        # PACS forward whole studies: dose reports, secondary captures, presentation states.
        return Decision("ignore", "not_ct" if "PixelData" in ds else "non_image")
    if str(ds.get("Modality", "")).upper() != "CT":
        # PS3.3 C.8.2.1: a CT Image has Modality CT. Refuse rather than silently not score.
        return Decision("reject", "modality_not_ct", DATASET_MISMATCH)
    if ds.get("SOPClassUID") != sop_class_uid:
        return Decision("reject", "sop_class_mismatch", DATASET_MISMATCH)
    for keyword in REQUIRED_UIDS:
        if not str(ds.get(keyword, "")).strip():
            return Decision("reject", "missing_uid", DATASET_MISMATCH)
    if ds.SOPInstanceUID != sop_instance_uid:
        # PS3.7 §9.3.1.1: the Affected SOP Instance UID is the data set's SOP Instance UID.
        return Decision("reject", "uid_mismatch", DATASET_MISMATCH)
    try:
        # Header only: no pixel is decoded here. PS3.3 A.38/A.70: an Enhanced or Legacy
        # Converted Enhanced CT holds up to MAX_FRAMES frames; a CT Image holds one.
        check_slice(ds, require_ct=False,
                    max_frames=MAX_FRAMES if sop_class_uid in MULTI_FRAME_CT else 1)
    except SliceError as exc:
        # PS3.3 A.3/C.8.2.1: a CT image is one sample per pixel, monochrome, one frame; refuse
        # what the worker cannot score now, while the sender can still be told, rather than
        # fail it later unseen. (8- and 32-bit pixels are tolerated: the worker decodes them.)
        status = CANNOT_UNDERSTAND if exc.reason in ("truncated", "undecodable") else DATASET_MISMATCH
        return Decision("reject", exc.reason, status)
    return QUEUE


def slice_meta(ds: Dataset, calling_ae: str, received_at: float) -> SliceMeta:
    """The task message fields. Malformed optional values become None: ordering hints are not
    a reason to refuse a slice. No patient name, ID or birth date is copied."""
    return SliceMeta(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        instance_number=_optional(lambda: int(ds.InstanceNumber)),
        slice_position=_optional(lambda: float(ds.ImagePositionPatient[2])),
        accession_number=str(ds.get("AccessionNumber", "") or ""),
        calling_ae=calling_ae,
        received_at=received_at,
    )


def _optional(read):
    try:
        return read()
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):
        return None
