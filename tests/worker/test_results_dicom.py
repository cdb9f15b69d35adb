"""Results to PACS for a multi-frame CT (issue 15): the SR names the key frames, the key image
names its source frame, and dciodvfy (dicom3tools) finds no error in either. The Orthanc test
(tests/e2e/test_pacs.py) covers classic slices end to end; this one builds the objects directly
from what the scoring worker keeps for a study (ich:study:<uid>:evidence)."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
from pydicom.uid import EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage

from ich.imaging import header_bytes
from ich.labels import ANY, LABELS
from tests.ctfactory import enhanced_ct, to_bytes
from training.synthetic import make_study
from worker import pacs


def _alert(multi, kind: str, frames: list[int]) -> dict:
    scores = {label: 0.05 for label in LABELS} | {"intraparenchymal": 0.91, ANY: 0.93}
    return {"alert_id": "a1", "kind": kind, "study_instance_uid": multi.StudyInstanceUID,
            "series_instance_uid": multi.SeriesInstanceUID, "model_version": "test-1",
            "scores": scores, "thresholds": {label: 0.5 for label in LABELS}, "complete": True,
            "positive": {label: scores[label] >= 0.5 for label in LABELS},
            "positive_slices": [{"sop_instance_uid": multi.SOPInstanceUID, "frame_number": f,
                                 "sop_class_uid": str(multi.SOPClassUID),
                                 "series_instance_uid": multi.SeriesInstanceUID} for f in frames]}


def _walk(ds):
    """(keyword, value) of every element, nested sequences included."""
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item)
        else:
            yield element.keyword, element.value


def _errors(path) -> list[str]:
    checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("enhanced", [False, True], ids=["legacy-converted", "enhanced"])
def test_results_for_a_multi_frame_ct_name_their_frames_and_validate(tmp_path, enhanced):
    slices = make_study(11, 1, slices=(8, 10), subtypes=("intraparenchymal",), site="legacy")
    multi = enhanced_ct([s.dataset for s in slices], enhanced=enhanced)
    assert multi.SOPClassUID == (EnhancedCTImageStorage if enhanced else LegacyConvertedEnhancedCTImageStorage)
    key = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    evidence = {"header": header_bytes(multi), "key_pixels": key.tobytes(), "key_shape": b"64x64",
                "key_sop_instance_uid": multi.SOPInstanceUID.encode(),
                "key_sop_class_uid": str(multi.SOPClassUID).encode(),
                "key_series_instance_uid": multi.SeriesInstanceUID.encode(),
                "key_frame": b"4", "key_any": b"0.93"}
    sr, image = pacs.build(_alert(multi, "first_positive", [3, 4, 5]), evidence, previous=None)

    frames = {tuple(int(f) for f in v) for k, v in _walk(sr) if k == "ReferencedFrameNumber"}
    assert frames == {(3, 4, 5)}, frames   # every source-image reference names the key frames
    assert {v for k, v in _walk(sr) if k == "ReferencedSOPInstanceUID"} == {multi.SOPInstanceUID}
    assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == multi.SOPInstanceUID
    assert int(image.SourceImageSequence[0].ReferencedFrameNumber) == 4
    assert image.StudyInstanceUID == sr.StudyInstanceUID == multi.StudyInstanceUID
    for name, ds in (("sr", sr), ("key", image)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(to_bytes(ds))
        assert not _errors(path), f"{name}: {_errors(path)}"
