"""policy.classify: the per-instance rules, without a network."""
from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage, XRayRadiationDoseSRStorage

from dicom_listener import policy
from ich.imaging import MAX_FRAMES
from tests.ctfactory import ct_dataset, enhanced_ct, head_hu


def decide(ds: Dataset, sop_class=CTImageStorage):
    return policy.classify(ds, sop_class, ds.get("SOPInstanceUID", ""))


def test_ct_slice_is_queued():
    assert decide(ct_dataset(head_hu())) == policy.QUEUE


def test_other_image_classes_are_ignored():
    ds = ct_dataset(head_hu())
    ds.SOPClassUID = SecondaryCaptureImageStorage
    assert decide(ds, SecondaryCaptureImageStorage) == policy.Decision("ignore", "not_ct")


@pytest.mark.parametrize("enhanced", [False, True], ids=["legacy-converted", "enhanced"])
def test_multi_frame_ct_is_queued_within_the_frame_limit(enhanced):
    slices = [ct_dataset(head_hu()) for _ in range(3)]
    for ds in slices:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = slices[0].StudyInstanceUID, slices[0].SeriesInstanceUID
    multi = enhanced_ct(slices, enhanced=enhanced)
    assert decide(multi, multi.SOPClassUID) == policy.QUEUE
    multi.NumberOfFrames = MAX_FRAMES + 1   # a header that would make the worker decode 1,001
    assert decide(multi, multi.SOPClassUID) == policy.Decision("reject", "too_large",
                                                               policy.DATASET_MISMATCH)


def test_dose_report_is_ignored_as_non_image():
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = XRayRadiationDoseSRStorage, generate_uid(), "SR"
    assert decide(ds, XRayRadiationDoseSRStorage) == policy.Decision("ignore", "non_image")


def test_ct_class_with_other_modality_is_refused():
    ds = ct_dataset(head_hu(), modality="MR")
    assert decide(ds) == policy.Decision("reject", "modality_not_ct", policy.DATASET_MISMATCH)


@pytest.mark.parametrize("mutate, reason, status", [
    (lambda ds: delattr(ds, "StudyInstanceUID"), "missing_uid", policy.DATASET_MISMATCH),
    (lambda ds: setattr(ds, "SOPClassUID", SecondaryCaptureImageStorage), "sop_class_mismatch",
     policy.DATASET_MISMATCH),
    (lambda ds: delattr(ds, "PixelData"), "no_pixel_data", policy.DATASET_MISMATCH),
    (lambda ds: setattr(ds, "Rows", 65535), "too_large", policy.DATASET_MISMATCH),
    (lambda ds: setattr(ds, "NumberOfFrames", 0), "bad_geometry", policy.DATASET_MISMATCH),
    (lambda ds: setattr(ds, "PhotometricInterpretation", "RGB"), "unsupported_photometric",
     policy.DATASET_MISMATCH),
    (lambda ds: setattr(ds, "PixelData", ds.PixelData[:10]), "truncated", policy.CANNOT_UNDERSTAND),
])
def test_broken_ct_images_are_refused_with_a_named_status(mutate, reason, status):
    ds = ct_dataset(head_hu())
    mutate(ds)
    assert decide(ds) == policy.Decision("reject", reason, status)


def test_instance_uid_must_match_the_request():
    ds = ct_dataset(head_hu())
    assert policy.classify(ds, CTImageStorage, generate_uid()) == policy.Decision(
        "reject", "uid_mismatch", policy.DATASET_MISMATCH)


def test_data_set_without_identity_cannot_be_understood():
    ds = Dataset()
    ds.PixelData = b"\0" * 16
    assert decide(ds) == policy.Decision("reject", "undecodable", policy.CANNOT_UNDERSTAND)


def test_slice_meta_tolerates_malformed_optional_fields_and_copies_no_phi():
    ds = ct_dataset(head_hu())
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JOHN", "MRN1", "19500101"
    ds.ImagePositionPatient = [1.0, 2.0]  # only two values: position unknown, not an error
    meta = policy.slice_meta(ds, "CT1", received_at=123.0)
    assert meta.slice_position is None and meta.instance_number is None
    assert meta.calling_ae == "CT1" and meta.received_at == 123.0
    assert not {"DOE^JOHN", "MRN1", "19500101"} & set(map(str, vars(meta).values()))
