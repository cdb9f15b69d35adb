"""Build small CT datasets from a known HU array, so tests can check decoding exactly."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def head_hu(size: int = 64, seed: int = 0) -> np.ndarray:
    """A crude head: air, a skull ring, brain with noise and a calcified spot (integer HU)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    r = np.hypot(x, y * 1.15)
    hu = np.full((size, size), -1000.0)
    hu[r < 0.85] = 1100
    hu[r < 0.75] = 35 + rng.normal(0, 4, (size, size))[r < 0.75]
    hu[(x - 0.3) ** 2 + y ** 2 < 0.01] = 300  # a calcification: bright but not blood
    return np.round(hu).astype(np.int32)


def ct_dataset(hu: np.ndarray, *, signed: bool = True, slope: float = 1.0,
               intercept: float = -1024.0, bits_stored: int = 16,
               modality: str = "CT", stored: np.ndarray | None = None) -> Dataset:
    """A valid CT Image Storage dataset whose pixels decode (with rescale) to `hu`."""
    if stored is None:
        stored = np.round((hu - intercept) / slope)
    stored = stored.astype(np.int16 if signed else np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.WindowCenter = [40, 40]
    ds.WindowWidth = [80, 80]
    ds.PixelData = stored.tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dcmtk_convert(tool: str, args: list[str], ds: Dataset, tmp: Path) -> Dataset:
    """Run a DCMTK converter (dcmcjpeg, dcmcjpls, dcmcrle) on `ds` and read its output."""
    src, dst = tmp / f"{tool}-in.dcm", tmp / f"{tool}-out.dcm"
    src.write_bytes(to_bytes(ds))
    subprocess.run([tool, *args, str(src), str(dst)], check=True, capture_output=True)
    return pydicom.dcmread(dst)


def lesion_hu(size: int = 64, seed: int = 0, bleed: bool = True) -> np.ndarray:
    """`head_hu` plus, when `bleed`, a large 70 HU lesion (~6 % of the image): the tiny
    `blood_detector` model of tests/modelfactory.py scores it positive, the plain head not."""
    hu = head_hu(size, seed)
    if bleed:
        y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
        hu[(x + 0.25) ** 2 + (y - 0.1) ** 2 < 0.3 ** 2] = 70
    return hu


def enhanced_ct(slices: list[Dataset], enhanced: bool = False) -> Dataset:
    """The slices of one series as one multi-frame object, by highdicom's legacy conversion
    (Legacy Converted Enhanced CT, PS3.3 A.70); `enhanced=True` relabels it Enhanced CT Image
    Storage, which is what the worker reads the same way (functional groups). Headers a real
    scanner writes and ct_dataset omits are filled in on copies."""
    import copy

    from highdicom.legacy import LegacyConvertedEnhancedCTImage
    from pydicom.uid import EnhancedCTImageStorage

    filled, frame_of_reference = [], generate_uid()
    for n, ds in enumerate(slices):
        ds = copy.deepcopy(ds)
        for keyword, value in (("Manufacturer", "ICH Watch tests"), ("PatientName", "PHANTOM^LEAKCHECK"),
                               ("PatientID", "PID31415926"), ("PatientBirthDate", ""),
                               ("PatientSex", "O"), ("StudyDate", "20261202"), ("StudyTime", "120000"),
                               ("ReferringPhysicianName", ""), ("AccessionNumber", "ACC777"),
                               ("StudyID", "1"), ("SeriesNumber", 1), ("PixelSpacing", [0.5, 0.5]),
                               ("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]),
                               ("ImagePositionPatient", [0, 0, 5.0 * n]), ("SliceThickness", 5.0),
                               ("FrameOfReferenceUID", frame_of_reference),
                               ("ImageType", ["ORIGINAL", "PRIMARY", "AXIAL"]),
                               ("AcquisitionNumber", 1), ("KVP", 120), ("InstanceNumber", n + 1)):
            if keyword not in ds:
                setattr(ds, keyword, value)
        filled.append(ds)
    out = LegacyConvertedEnhancedCTImage(filled, generate_uid(), 9, generate_uid(), 1)
    if enhanced:
        out.SOPClassUID = out.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    return out
