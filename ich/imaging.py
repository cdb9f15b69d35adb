"""DICOM slice → Hounsfield units → three CT windows as a float32 image, for training and serving.

This is the only preprocessing in the project: the worker and `python -m training` both call
`load_slice()`, so what the model saw in training is what it sees in service. Scaling that
belongs to a particular network (Inception's [-1, 1]) lives inside the saved model; this module
returns windows in [0, 1].

A slice that cannot be used raises `SliceError` with a reason code — it is never turned into a
blank image that the model would score as normal.
"""
from __future__ import annotations

import io
import os
import zlib
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array

#: Largest Rows/Columns we decode: real CT is ≤ 1024²; a hostile header must not allocate GBs.
MAX_DIMENSION = 4096
#: Largest inflated Deflated Explicit VR data set: a 1024² 16-bit slice with headers fits.
MAX_INFLATED_BYTES = 16 * 2**20
#: Most frames scored from one multi-frame CT object (Enhanced CT, Legacy Converted Enhanced
#: CT): a head series has 30-300; the header is checked before any frame is decoded.
MAX_FRAMES = 1000
#: Air, used for pixels outside the scanner's field of view (PixelPaddingValue).
AIR_HU = -1000.0


class Window(NamedTuple):
    level: float
    width: float


#: Brain, subdural and soft-tissue windows: the three input channels, in this order.
WINDOWS: tuple[Window, ...] = (Window(40, 80), Window(80, 200), Window(40, 380))

#: Bump when `load_hu`'s output changes (rescale, padding, resize): prepared training caches
#: (training.prepare) record it and are refused when it differs, so train and serve cannot drift.
PREPROCESSING_VERSION = 1

#: Every reason code `SliceError` can carry; metric labels and logs use these.
REASONS = frozenset({
    "undecodable",              # not DICOM, or the pixel codec failed
    "truncated",                # file or pixel data shorter than the header says
    "not_ct",                   # Modality is not CT
    "no_pixel_data",            # no (7FE0,0010) Pixel Data element
    "bad_geometry",             # Rows/Columns missing or zero
    "too_large",                # Rows/Columns over MAX_DIMENSION
    "multi_frame",              # NumberOfFrames > 1 where one slice is expected
    "unsupported_photometric",  # colour or anything but MONOCHROME1/2 with one sample
    "unsupported_bits",         # BitsAllocated/BitsStored we cannot interpret
    "blank",                    # every pixel has the same value: nothing to score
})


class Frame(NamedTuple):
    """One scored image of an instance: a classic CT slice (number None) or one frame of a
    multi-frame object, with the z its Plane Position functional group gives (PS3.3 C.7.6.16)."""

    number: int | None
    position: float | None
    image: np.ndarray


class SliceError(ValueError):
    """A slice that cannot be scored; `reason` is one of REASONS (safe for logs and labels)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


Source = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO | Dataset


def read_dataset(source: Source) -> Dataset:
    """Parse a DICOM Part 10 file (bytes, path or file object); a Dataset passes through."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    elif not hasattr(source, "read"):
        source = io.BytesIO(Path(source).read_bytes())
    _refuse_deflate_bomb(source)
    try:
        ds = pydicom.dcmread(source)
    except InvalidDicomError as exc:
        raise SliceError("undecodable", f"not a DICOM file ({exc})") from None
    except (EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise SliceError("truncated", f"file ends early ({exc})") from None
    except Exception as exc:  # pydicom raises many types for malformed element streams
        raise SliceError("undecodable", f"{type(exc).__name__}: {exc}") from None
    if len(ds) == 0:  # pydicom stops quietly at EOF: a file cut inside its header reads empty
        raise SliceError("truncated", "no data set after the file meta information")
    return ds


def _refuse_deflate_bomb(fp: BinaryIO) -> None:
    """Deflated Explicit VR (PS3.5 A.5) is inflated whole by pydicom: a few hundred KiB can
    become gigabytes. Inflate into a bounded buffer first and refuse what would not fit."""
    start = fp.tell()
    try:
        pydicom.filereader.read_preamble(fp, False)
        meta = pydicom.filereader._read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflater.decompress(fp.read(), MAX_INFLATED_BYTES + 1)
        if inflater.unconsumed_tail:
            raise SliceError("too_large", f"deflated data set inflates past {MAX_INFLATED_BYTES} bytes")
    except SliceError:
        raise
    except Exception:  # not Part 10, a broken meta group or stream: dcmread reports it
        return
    finally:
        fp.seek(start)


def check_slice(ds: Dataset, require_ct: bool = True, max_frames: int = 1) -> None:
    """Header checks that are cheap and must precede decoding (a hostile header must fail
    here, before any allocation). PS3.3 C.7.6.3 Image Pixel Module defines these attributes.
    `max_frames` > 1 admits a multi-frame object of up to that many frames."""
    modality = _get(ds, "Modality")
    if require_ct and str(modality or "").upper() != "CT":
        raise SliceError("not_ct", f"Modality {modality!r}")
    if "PixelData" not in ds or not _get(ds, "PixelData"):  # pydicom reads length 0 as None
        raise SliceError("no_pixel_data", "no Pixel Data element")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols:
        raise SliceError("bad_geometry", f"Rows={rows} Columns={cols}")
    if rows > MAX_DIMENSION or cols > MAX_DIMENSION:
        raise SliceError("too_large", f"{rows}x{cols} exceeds {MAX_DIMENSION}")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames < 1:
        raise SliceError("bad_geometry", f"NumberOfFrames={frames}")
    if frames > 1 and max_frames == 1:
        raise SliceError("multi_frame", f"NumberOfFrames={frames}")
    if frames > max_frames:
        raise SliceError("too_large", f"NumberOfFrames={frames} exceeds {max_frames}")
    photometric = str(_get(ds, "PhotometricInterpretation") or "").strip()
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SliceError("unsupported_photometric", f"{photometric or 'none'}, {samples} samples")
    allocated, stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
    if allocated not in (8, 16, 32) or not stored or stored > allocated:
        raise SliceError("unsupported_bits", f"BitsAllocated={allocated} BitsStored={stored}")
    meta = getattr(ds, "file_meta", None) or {}
    if not meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian).is_compressed:
        expected = rows * cols * allocated // 8 * frames
        have = len(ds.PixelData)
        if have < expected:
            raise SliceError("truncated", f"pixel data {have} bytes, header implies {expected}")
        if have > expected + 1:  # one byte of padding to an even length is legal (PS3.5 §8.1.1)
            raise SliceError("bad_geometry", f"pixel data {have} bytes, header implies {expected}")


def to_hu(ds: Dataset) -> np.ndarray:
    """Decode pixels and apply the modality LUT (RescaleSlope/Intercept) → float32 HU.

    Includes the known RSNA 2019 fix: some 12-bit unsigned slices carry an intercept near 0
    while their values wrapped modulo 4096; they are unwrapped and given intercept -1000.
    Pixels equal to PixelPaddingValue (outside the scanner's field of view) become air.
    """
    stored = _decode(ds)
    if stored.ndim != 2:
        raise SliceError("multi_frame", f"decoded shape {stored.shape}")
    return _rescale(ds, stored, _float(ds, "RescaleSlope", 1.0), _float(ds, "RescaleIntercept", 0.0))


def load_frames(source: Source, size: int = 224, only: int | None = None) -> list[Frame]:
    """Every image of an instance → windows: one Frame for a classic CT slice, one per frame
    (in frame order) for Enhanced CT and Legacy Converted Enhanced CT (PS3.3 A.38, A.70).
    A frame's rescale and z come from its Per-Frame Functional Groups, else the Shared ones
    (Pixel Value Transformation C.7.6.16.2.9, Plane Position C.7.6.16.2.3). Frames are decoded
    one at a time: a long series never holds every frame in float32 at once. `only`: just
    that frame number."""
    ds = read_dataset(source)
    check_slice(ds, max_frames=MAX_FRAMES)
    n = _int(ds, "NumberOfFrames", 1)
    if n == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        return [Frame(None, None, windows(resize(to_hu(ds), size)))]
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence") or []
    shared = (_get(ds, "SharedFunctionalGroupsSequence") or [Dataset()])[0]
    if len(per_frame) not in (0, n):
        raise SliceError("bad_geometry", f"{len(per_frame)} per-frame groups for {n} frames")
    frames = []
    for i in range(n) if only is None else [only - 1]:
        groups = per_frame[i] if per_frame else Dataset()
        transform = _group(groups, shared, "PixelValueTransformationSequence") or ds
        plane = _group(groups, shared, "PlanePositionSequence")
        stored = _decode(ds, index=i)
        hu = _rescale(ds, stored, _float(transform, "RescaleSlope", 1.0),
                      _float(transform, "RescaleIntercept", 0.0))
        position = None
        if plane is not None:
            try:
                position = float(plane.ImagePositionPatient[2])
            except (AttributeError, TypeError, ValueError, IndexError):
                position = None
        frames.append(Frame(i + 1, position, windows(resize(hu, size))))
    return frames


def header_bytes(ds: Dataset) -> bytes:
    """A Part 10 file of `ds` without its pixels and per-frame groups: the patient, study and
    series modules that results sent back to PACS copy (worker.pacs)."""
    head = Dataset()
    for element in ds:
        if element.tag.group < 0x7FE0 and element.tag != 0x52009230:
            head.add(element)
    head.file_meta = ds.file_meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, head, enforce_file_format=True)
    return buffer.getvalue()


def _group(per_frame: Dataset, shared: Dataset, keyword: str) -> Dataset | None:
    """The first item of a functional group macro, per-frame before shared (PS3.3 C.7.6.16)."""
    for groups in (per_frame, shared):
        items = groups.get(keyword)
        if items:
            return items[0]
    return None


def _decode(ds: Dataset, index: int | None = None) -> np.ndarray:
    """Stored pixel values of the instance, or of one frame (0-based `index`)."""
    try:
        if index is None:
            return ds.pixel_array
        return pixel_array(ds, index=index)
    except (ValueError, EOFError) as exc:
        reason = "truncated" if "length" in str(exc).lower() or isinstance(exc, EOFError) else "undecodable"
        raise SliceError(reason, f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # codec plugins raise RuntimeError, NotImplementedError, ...
        raise SliceError("undecodable", f"{type(exc).__name__}: {exc}") from None


def _rescale(ds: Dataset, stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    stored = stored.astype(np.int32, copy=False)
    padding = _padding_mask(ds, stored)
    if _int(ds, "BitsStored") == 12 and _int(ds, "PixelRepresentation") == 0 and intercept > -100:
        stored = stored + 1000
        stored[stored >= 4096] -= 4096
        intercept = -1000.0
    hu = stored.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    hu += np.float32(intercept)
    if padding is not None:
        hu[padding] = AIR_HU
    if not np.isfinite(hu).all():  # an absurd slope/intercept overflows float32
        raise SliceError("undecodable", "rescaled values are not finite")
    if hu.size and hu.min() == hu.max():
        raise SliceError("blank", f"every pixel is {hu.flat[0]:g} HU")
    return hu


def window_bounds(windows: tuple[Window, ...] = WINDOWS) -> tuple[np.ndarray, np.ndarray]:
    """(lows, widths) float32 of each window: channel = clip((HU − low) / width, 0, 1). The
    training pipeline applies the same arithmetic in TensorFlow on prepared HU."""
    lows = np.array([w.level - w.width / 2 for w in windows], dtype=np.float32)
    widths = np.array([w.width for w in windows], dtype=np.float32)
    return lows, widths


def windows(hu: np.ndarray, windows: tuple[Window, ...] = WINDOWS) -> np.ndarray:
    """HU (H, W) → (H, W, len(windows)) float32, each channel clipped to its window, in [0, 1]."""
    lows, widths = window_bounds(windows)
    out = hu[..., None] - lows
    out /= widths
    return np.clip(out, 0.0, 1.0, out=out)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D image to size×size with a separable triangle (antialiased bilinear) filter:
    two matrix products, vectorised and identical in training and serving."""
    rows, cols = image.shape
    if (rows, cols) == (size, size):
        return image.astype(np.float32, copy=False)
    return _resize_matrix(rows, size) @ image.astype(np.float32, copy=False) @ _resize_matrix(cols, size).T


def load_slice(source: Source, size: int = 224, require_ct: bool = True) -> np.ndarray:
    """One slice → (size, size, 3) float32 windows in [0, 1]; raises SliceError."""
    return windows(load_hu(source, size, require_ct))


def load_hu(source: Source, size: int = 224, require_ct: bool = True) -> np.ndarray:
    """One slice → (size, size) float32 HU, resized: `load_slice` before windowing (training
    augments here, in HU, where scanners differ). Resizing in HU (linear) then windowing
    resamples one channel instead of three."""
    ds = read_dataset(source)
    check_slice(ds, require_ct=require_ct)
    return resize(to_hu(ds), size)


@lru_cache(maxsize=64)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a triangle filter widened by the scale factor when shrinking,
    pixel centres aligned like PIL/TF `antialias=True`; rows sum to 1."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    distance = np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support
    weights = np.maximum(0.0, 1.0 - distance)
    weights /= weights.sum(axis=1, keepdims=True)
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Pixels in [PixelPaddingValue, PixelPaddingRangeLimit] (PS3.3 C.7.5.1.1.2), or None."""
    if "PixelPaddingValue" not in ds:
        return None
    value = _int(ds, "PixelPaddingValue")
    limit = _int(ds, "PixelPaddingRangeLimit", value)
    if _int(ds, "PixelRepresentation") == 1:  # implicit VR reads "US or SS" as unsigned
        value, limit = (v - 65536 if v > 32767 else v for v in (value, limit))
    lo, hi = min(value, limit), max(value, limit)
    mask = (stored >= lo) & (stored <= hi)
    return mask if mask.any() else None


def _get(ds: Dataset, keyword: str):
    """`ds.get` that turns pydicom's lazy conversion errors (bad VR, wrong length) into a
    SliceError: a malformed element fails its slice, never the caller's batch."""
    try:
        return ds.get(keyword)
    except Exception as exc:
        raise SliceError("undecodable", f"{keyword}: {type(exc).__name__}") from None


def _int(ds: Dataset, keyword: str, default: int = 0) -> int:
    value = _get(ds, keyword)
    if value is None or value == "":
        return default
    try:
        return int(value[0] if isinstance(value, (list, pydicom.multival.MultiValue)) else value)
    except (TypeError, ValueError):
        raise SliceError("undecodable", f"{keyword} is not an integer") from None


def _float(ds: Dataset, keyword: str, default: float) -> float:
    """Numeric attribute tolerant of multi-valued fields (RSNA files carry some)."""
    value = _get(ds, keyword)
    if value is None or value == "":
        return default
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        value = value[0]
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise SliceError("undecodable", f"{keyword} is not a number") from None
    if not np.isfinite(result):
        raise SliceError("undecodable", f"{keyword} is not finite")
    return result
