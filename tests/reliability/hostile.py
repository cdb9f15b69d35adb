"""A hostile input corpus for the DICOM listener and the worker's decoder, generated in code.

Every case is the data set exactly as a peer puts it on the wire (no file meta: the
presentation context carries the transfer syntax), the Affected SOP Class/Instance UIDs of the
C-STORE request and the transfer syntax of the presentation context it is sent on, with the
outcome we expect:

* `status` — the C-STORE response status (0x0000 queued or ignored, 0xA900, 0xC210), or None
  when the listener refuses the presentation context at association time (the instance is
  never sent);
* `reason` — the ignore/reject reason (the `ErrorComment` of a failure response, the metric
  label and the log reason), "" for a queued slice;
* `worker` — for a queued slice, what `ich.imaging.load_frames` makes of the bytes the listener
  stored: "ok" or the `SliceError.reason` the worker records as the failed result.

The payloads are built element by element so that a case can carry what pydicom would never
write (an invalid VR, a wrong length, a truncated value, a deflate bomb). No binary fixture is
committed; UIDs are derived from the case name, so the corpus is the same on every run.
"""
from __future__ import annotations

import copy
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.uid import (
    UID, BasicTextSRStorage, CTImageStorage, DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
    JPEG2000Lossless, JPEGBaseline8Bit, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, RLELossless,
    SecondaryCaptureImageStorage, generate_uid,
)

from tests.ctfactory import ct_dataset, head_hu, lesion_hu

SUCCESS, MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0xA900, 0xC210
#: A SOP class no one registered: the listener has no presentation context for it.
UNKNOWN_SOP_CLASS = UID("1.2.826.0.1.3680043.8.498.4242.1")
SIZE = 64  # every image of the corpus is 64×64 unless the case is about geometry
#: Deflate bombs inflate to this many bytes of pixel data (from a few hundred KiB on the wire).
BOMB_BYTES = 256 * 1024 * 1024

# (group, element) of the attributes the cases tamper with.
PIXEL_DATA, ROWS, COLUMNS = 0x7FE00010, 0x00280010, 0x00280011
BITS_ALLOCATED, BITS_STORED, HIGH_BIT = 0x00280100, 0x00280101, 0x00280102
PIXEL_REPRESENTATION, SAMPLES, PHOTOMETRIC = 0x00280103, 0x00280002, 0x00280004
NUMBER_OF_FRAMES, RESCALE_INTERCEPT, RESCALE_SLOPE = 0x00280008, 0x00281052, 0x00281053
PIXEL_PADDING = 0x00280120
STUDY_UID, SERIES_UID, SOP_INSTANCE_UID, SOP_CLASS_UID = 0x0020000D, 0x0020000E, 0x00080018, 0x00080016

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


#: Invariants a known bug breaks; its case's listener test asserts the invariant, xfail(strict).
INVARIANTS = {
    "exact": "the expected status, reason and worker outcome",
    "refused": "the sender is told: a failure status (0xA900/0xC210) with a reason",
    "worker_agrees": "a slice answered Success decodes in the worker (or is refused up front)",
    "finite": "a queued slice decodes to a finite image or fails with a SliceError reason",
    "bounded": "the listener's peak RSS grows by less than the bound while handling it",
}


@dataclass(frozen=True)
class Case:
    name: str
    payload: bytes                   # the encoded data set as sent (deflated if the context is)
    sop_class: str                   # Affected SOP Class UID = presentation context abstract syntax
    sop_instance: str                # Affected SOP Instance UID of the C-STORE request
    transfer_syntax: str             # the presentation context's transfer syntax
    status: int | None               # expected C-STORE status; None: context refused
    reason: str = ""                 # expected ignore/reject reason ("" when queued)
    worker: str | None = None        # queued: "ok" or the worker's failed reason
    what: str = ""                   # one line for the outcome table
    also: frozenset = frozenset()    # other acceptable (status, reason) pairs, see the case
    bug: str = ""                    # known bug on the listener → worker path: expectation is
    invariant: str = "exact"         #   the correct outcome; the test asserts `invariant`
    decoder_bug: str = ""            # known bug of ich.imaging.load_slice on these bytes

    @property
    def outcome(self) -> str:
        return outcome_of(self.status, self.reason)

    def expected(self) -> str:
        return describe(self.status, self.reason, self.worker)


def outcome_of(status: int | None, reason: str) -> str:
    if status is None:
        return "context_rejected"
    if status != SUCCESS:
        return "rejected"
    return "ignored" if reason else "queued"


def describe(status: int | None, reason: str, worker: str | None = None) -> str:
    if status is None:
        return "presentation context rejected"
    text = f"0x{status:04X} {outcome_of(status, reason)}"
    if reason:
        text += f" ({reason})"
    if worker:
        text += f" → worker {worker}"
    return text


# --- encoding primitives -------------------------------------------------------------------

def element(tag: int, vr: bytes | None, value: bytes, length: int | None = None) -> bytes:
    """One little-endian element, written by hand: `vr` None means implicit VR; `length`
    overrides the value length field (a lie, for the wrong-length cases)."""
    n = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if vr is None:
        return head + struct.pack("<I", n) + value
    if vr in _LONG_VRS:
        return head + vr + b"\0\0" + struct.pack("<I", n) + value
    return head + vr + struct.pack("<H", n) + value


def encapsulated(items: bytes) -> bytes:
    """Pixel Data of undefined length holding `items` (pydicom.encaps.encapsulate output),
    closed by the Sequence Delimitation Item."""
    return element(PIXEL_DATA, b"OB", items + b"\xfe\xff\xdd\xe0\0\0\0\0", length=0xFFFFFFFF)


def text(value: str) -> bytes:
    """A string value padded to even length, as PS3.5 §6.2 requires."""
    raw = value.encode("ascii")
    return raw + b" " * (len(raw) % 2)


def uid_value(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" * (len(raw) % 2)


def encode(ds: Dataset, implicit: bool = False, raw: dict[int, bytes | None] | None = None) -> bytes:
    """`ds` encoded little endian, element by element; `raw` replaces (bytes) or drops (None)
    the element of a tag, or adds one, keeping ascending tag order."""
    parts: dict[int, bytes] = {}
    for elem in _unambiguous(ds):
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, implicit
        write_data_element(fp, elem)
        parts[int(elem.tag)] = fp.getvalue()
    for tag, value in (raw or {}).items():
        if value is None:
            parts.pop(tag, None)
        else:
            parts[tag] = value
    return b"".join(parts[tag] for tag in sorted(parts))


def _unambiguous(ds: Dataset) -> Dataset:
    """A copy with 'OB or OW' / 'US or SS' VRs resolved as pydicom would when writing (or, if
    the header is too broken for that, OW and US)."""
    ds = copy.deepcopy(ds)
    try:
        correct_ambiguous_vr(ds, is_little_endian=True)
    except (AttributeError, ValueError):
        pass
    for elem in ds:
        if " or " in elem.VR:
            elem.VR = "OW" if "OW" in elem.VR else "US" if "US" in elem.VR else elem.VR.split(" or ")[0]
    return ds


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate, PS3.5 §A.5
    return c.compress(data) + c.flush()


@lru_cache(maxsize=1)
def _deflated_zero_mib() -> bytes:
    """1 MiB of zeros as self-contained deflate blocks (full flush, no final bit): repeating
    it N times inflates to N MiB of zeros, so a bomb costs no compression time to build."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)


def deflate_bomb(head: bytes, zero_bytes: int) -> bytes:
    """Raw deflate of `head` followed by `zero_bytes` (a multiple of 1 MiB) zeros."""
    assert zero_bytes % (1 << 20) == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()  # the final, empty block
    return start + _deflated_zero_mib() * (zero_bytes >> 20) + end


def part10(payload: bytes, transfer_syntax: str, sop_class: str, sop_instance: str) -> bytes:
    """A DICOM file as the listener stores it (`event.encoded_dataset()`): preamble, file meta
    with the context's transfer syntax, then the data set bytes exactly as received."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + fp.getvalue() + payload


def case_part10(case: Case) -> bytes:
    return part10(case.payload, case.transfer_syntax, case.sop_class, case.sop_instance)


# --- datasets ------------------------------------------------------------------------------

def uid(*parts: object) -> UID:
    return generate_uid(entropy_srcs=["ich-watch hostile corpus", *map(str, parts)])


STUDY, SERIES = uid("study"), uid("series")


def base(name: str, seed: int = 0, hu: np.ndarray | None = None, **kw) -> Dataset:
    """A valid 64×64 CT slice of the corpus study with UIDs derived from `name`."""
    ds = ct_dataset(head_hu(SIZE, seed) if hu is None else hu, **kw)
    ds.SOPInstanceUID = uid(name)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.InstanceNumber = seed
    del ds.file_meta
    return ds


def case(name: str, ds_or_bytes: Dataset | bytes, status: int | None, reason: str = "",
         worker: str | None = None, *, what: str, sop_class: str = CTImageStorage,
         sop_instance: str | None = None, ts: str = ExplicitVRLittleEndian,
         raw: dict[int, bytes | None] | None = None, **extra) -> Case:
    if isinstance(ds_or_bytes, Dataset):
        ds = ds_or_bytes
        payload = encode(ds, implicit=UID(ts).is_implicit_VR, raw=raw)
        if UID(ts).is_deflated:
            payload = deflate(payload)
        sop_instance = sop_instance or str(ds.get("SOPInstanceUID", "") or uid(name))
    else:
        payload = ds_or_bytes
        sop_instance = sop_instance or uid(name)
    if status == SUCCESS and not reason and worker is None:
        worker = "ok"
    return Case(name, payload, str(sop_class), str(sop_instance), str(ts), status, reason,
                worker, what, **extra)


def good_slices(n: int, start: int = 100) -> list[Case]:
    """Valid slices of the corpus study, sent between the hostile cases: all must be queued."""
    return [case(f"good_{i}", base(f"good_{i}", seed=start + i), SUCCESS,
                 what="valid 64x64 CT slice") for i in range(n)]


def _us(v: int) -> bytes:
    return struct.pack("<H", v)


def _with(ds: Dataset, **attrs) -> Dataset:
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def hostile_cases(bomb_bytes: int = BOMB_BYTES) -> list[Case]:
    C = []  # noqa: N806 (reads like a table)
    add = C.append
    good = base("reference")
    good_bytes = encode(good)
    pixels_at = good_bytes.index(struct.pack("<HH", 0x7FE0, 0x0010))
    sop_uid_at = good_bytes.index(struct.pack("<HH", 0x0008, 0x0018))
    study_uid_at = good_bytes.index(struct.pack("<HH", 0x0020, 0x000D))

    # --- not DICOM at all ------------------------------------------------------------------
    add(case("not_dicom_binary", b"\x13\x37" * 64, CANNOT_UNDERSTAND, "undecodable",
             what="128 bytes of 0x1337"))
    add(case("not_dicom_http", b"GET / HTTP/1.1\r\nHost: ichwatch\r\nAccept: */*\r\n\r\n" * 4,
             CANNOT_UNDERSTAND, "undecodable", what="an HTTP request as the data set"))
    add(case("not_dicom_png", b"\x89PNG\r\n\x1a\n" + np.random.default_rng(1).bytes(1024),
             CANNOT_UNDERSTAND, "undecodable", what="a PNG signature and noise"))
    add(case("random_bytes_64k", np.random.default_rng(2).bytes(65536), CANNOT_UNDERSTAND,
             "undecodable", what="64 KiB of random bytes"))
    add(case("part10_file_as_data_set",
             part10(encode(base("part10_file_as_data_set")), ExplicitVRLittleEndian,
                    CTImageStorage, uid("part10_file_as_data_set")),
             CANNOT_UNDERSTAND, "undecodable",
             what="a whole Part 10 file (preamble, DICM, meta) sent as the data set"))
    add(case("single_zero_element", element(0x00080005, b"CS", b""), CANNOT_UNDERSTAND,
             "undecodable", what="one empty Specific Character Set element, nothing else"))

    # --- truncation and wrong lengths ------------------------------------------------------
    # pydicom stops quietly at the end of the stream: what is left lacks Modality (0008,0060).
    add(case("cut_in_element_header", good_bytes[:sop_uid_at + 3], MISMATCH, "modality_not_ct",
             sop_instance=good.SOPInstanceUID,
             what="stream ends 3 bytes into the SOP Instance UID element"))
    add(case("cut_in_uid_value", good_bytes[:sop_uid_at + 8 + 5], MISMATCH, "modality_not_ct",
             sop_instance=good.SOPInstanceUID,
             what="stream ends 5 bytes into the SOP Instance UID value"))
    add(case("cut_after_modality", good_bytes[:study_uid_at + 8 + 5], MISMATCH, "missing_uid",
             sop_instance=good.SOPInstanceUID,
             what="stream ends 5 bytes into the Study Instance UID value"))
    add(case("cut_in_pixel_data", good_bytes[:pixels_at + 12 + SIZE * SIZE], CANNOT_UNDERSTAND,
             "truncated", sop_instance=good.SOPInstanceUID,
             what="Pixel Data declares 8192 bytes, stream ends after 4096"))
    ds = base("pixel_data_short")
    ds.PixelData = ds.PixelData[:100]
    add(case("pixel_data_short", ds, CANNOT_UNDERSTAND, "truncated",
             what="Pixel Data of 100 bytes for a 64x64x16-bit image"))
    ds = base("pixel_data_one_pixel_short")
    ds.PixelData = ds.PixelData[:-2]
    add(case("pixel_data_one_pixel_short", ds, CANNOT_UNDERSTAND, "truncated",
             what="Pixel Data 2 bytes short"))
    ds = base("pixel_data_empty")
    ds.PixelData = b""
    add(case("pixel_data_empty", ds, MISMATCH, "no_pixel_data",
             what="Pixel Data present with length 0"))
    add(case("pixel_data_missing", _with(base("pixel_data_missing"), PixelData=None), MISMATCH,
             "no_pixel_data", what="no (7FE0,0010) element"))
    ds = base("pixel_data_twice_too_long")
    ds.PixelData = ds.PixelData * 2
    add(case("pixel_data_twice_too_long", ds, MISMATCH, "bad_geometry",
             what="Pixel Data twice the size Rows x Columns implies"))
    ds = base("pixel_data_length_4g")
    add(case("pixel_data_length_4g", ds, SUCCESS, worker="ok",
             raw={PIXEL_DATA: element(PIXEL_DATA, b"OW", ds.PixelData, length=0xFFFFFFFE)},
             what="Pixel Data length field 0xFFFFFFFE, the 8192 bytes needed follow"))
    ds = base("pixel_data_undefined_length_native")
    add(case("pixel_data_undefined_length_native", ds, CANNOT_UNDERSTAND, "undecodable",
             raw={PIXEL_DATA: element(PIXEL_DATA, b"OW", ds.PixelData, length=0xFFFFFFFF)},
             what="native Pixel Data with undefined length (no items, no delimiter)"))
    ds = base("uid_length_past_end")
    add(case("uid_length_past_end", ds, MISMATCH, "missing_uid",
             raw={STUDY_UID: element(STUDY_UID, b"UI", uid_value(STUDY), length=0xFFFE)},
             what="Study Instance UID length 65534 swallows the rest of the data set"))

    # --- invalid VRs -----------------------------------------------------------------------
    ds = base("invalid_vr_rows")
    add(case("invalid_vr_rows", ds, CANNOT_UNDERSTAND, "undecodable",
             raw={ROWS: element(ROWS, b"ZZ", _us(SIZE))}, what="Rows with VR 'ZZ'"))
    ds = base("rows_three_bytes")
    add(case("rows_three_bytes", ds, CANNOT_UNDERSTAND, "undecodable",
             raw={ROWS: element(ROWS, b"US", b"\x40\x00\x00")}, what="Rows (US) of 3 bytes"))
    # Elements only the worker reads: the listener queues these, the worker must fail them alone.
    ds = base("slope_invalid_vr")
    add(case("slope_invalid_vr", ds, SUCCESS, worker="undecodable",
             raw={RESCALE_SLOPE: element(RESCALE_SLOPE, b"ZZ", text("1"))},
             what="RescaleSlope with VR 'ZZ' (only the worker reads it)"))
    ds = base("padding_three_bytes")
    add(case("padding_three_bytes", ds, SUCCESS, worker="undecodable",
             raw={PIXEL_PADDING: element(PIXEL_PADDING, b"US", b"\x00\x00\x00")},
             what="PixelPaddingValue (US) of 3 bytes (only the worker reads it)"))
    ds = base("rows_empty")
    add(case("rows_empty", ds, MISMATCH, "bad_geometry",
             raw={ROWS: element(ROWS, b"US", b"")}, what="Rows (US) of 0 bytes"))
    ds = base("rows_as_text")
    add(case("rows_as_text", ds, SUCCESS, worker="ok",
             raw={ROWS: element(ROWS, b"IS", text("64"))},
             what="Rows sent as IS '64' instead of US (value usable)"))
    ds = base("frames_not_a_number")
    add(case("frames_not_a_number", ds, CANNOT_UNDERSTAND, "undecodable",
             raw={NUMBER_OF_FRAMES: element(NUMBER_OF_FRAMES, b"IS", text("abc"))},
             what="NumberOfFrames IS 'abc'"))
    ds = base("deep_sequence_nesting")
    add(case("deep_sequence_nesting", ds, CANNOT_UNDERSTAND, "undecodable",
             raw={0x00081250: _nested_sequences(0x00081250, 5000)},
             what="5000 nested undefined-length sequences"))

    # --- geometry --------------------------------------------------------------------------
    add(case("dims_65535_square", _with(base("dims_65535_square"), Rows=65535, Columns=65535),
             MISMATCH, "too_large", what="Rows = Columns = 65535 (8 GiB at 16 bits), 8 KiB sent"))
    add(case("dims_65535_8bit", _with(base("dims_65535_8bit"), Rows=65535, Columns=65535,
                                      BitsAllocated=8, BitsStored=8, HighBit=7),
             MISMATCH, "too_large", what="65535 x 65535 x 8 bits"))
    add(case("rows_4097", _with(base("rows_4097"), Rows=4097), MISMATCH, "too_large",
             what="Rows 4097, one over MAX_DIMENSION"))
    add(case("rows_zero", _with(base("rows_zero"), Rows=0), MISMATCH, "bad_geometry",
             what="Rows 0"))
    add(case("columns_missing", _with(base("columns_missing"), Columns=None), MISMATCH,
             "bad_geometry", what="no Columns"))
    add(case("one_pixel", _with(base("one_pixel", hu=np.array([[40]])),), SUCCESS, worker="blank",
             what="a 1x1 image: one value, nothing to score"))
    thin = np.tile(head_hu(SIZE)[SIZE // 2], 64)[:, None]  # 4096 x 1, a brain profile
    add(case("thin_4096x1", base("thin_4096x1", hu=thin), SUCCESS, worker="ok",
             what="4096 x 1 image (extreme aspect ratio, within limits)"))

    # --- frames ----------------------------------------------------------------------------
    ds = base("two_frames")
    ds.NumberOfFrames, ds.PixelData = 2, ds.PixelData * 2
    add(case("two_frames", ds, MISMATCH, "multi_frame", what="NumberOfFrames 2 in CT Image Storage"))
    add(case("frames_2147483647", _with(base("frames_2147483647"), NumberOfFrames=2147483647),
             MISMATCH, "multi_frame", what="NumberOfFrames 2^31-1, one frame of data"))
    add(case("frames_zero", _with(base("frames_zero"), NumberOfFrames=0), MISMATCH, "bad_geometry",
             what="NumberOfFrames 0"))
    add(case("frames_negative", _with(base("frames_negative"), NumberOfFrames=-1), MISMATCH,
             "bad_geometry", what="NumberOfFrames -1"))
    ds = base("enhanced_ct")
    ds.SOPClassUID, ds.NumberOfFrames, ds.PixelData = EnhancedCTImageStorage, 3, ds.PixelData * 3
    add(case("enhanced_ct", ds, SUCCESS, sop_class=EnhancedCTImageStorage,
             what="Enhanced CT Image Storage, 3 frames without functional groups (each scored)"))
    ds = base("enhanced_ct_1001_frames")
    ds.SOPClassUID, ds.NumberOfFrames = EnhancedCTImageStorage, 1001
    add(case("enhanced_ct_1001_frames", ds, MISMATCH, "too_large", sop_class=EnhancedCTImageStorage,
             what="Enhanced CT declaring 1,001 frames (MAX_FRAMES 1,000), one frame of data"))

    # --- bits ------------------------------------------------------------------------------
    for allocated in (12, 1, 0):
        add(case(f"bits_allocated_{allocated}",
                 _with(base(f"bits_allocated_{allocated}"), BitsAllocated=allocated,
                       BitsStored=min(12, max(allocated, 1)), HighBit=min(11, max(allocated - 1, 0))),
                 MISMATCH, "unsupported_bits", what=f"BitsAllocated {allocated}"))
    add(case("bits_allocated_missing", _with(base("bits_allocated_missing"), BitsAllocated=None),
             MISMATCH, "unsupported_bits", what="no BitsAllocated"))
    add(case("bits_allocated_32_16bit_data",
             _with(base("bits_allocated_32_16bit_data"), BitsAllocated=32),
             CANNOT_UNDERSTAND, "truncated", what="BitsAllocated 32, data for 16 bits"))
    ds = base("bits_32_valid")
    ds.PixelData = np.frombuffer(ds.PixelData, np.int16).astype(np.int32).tobytes()
    add(case("bits_32_valid", _with(ds, BitsAllocated=32, BitsStored=32, HighBit=31), SUCCESS,
             worker="ok", what="a genuine 32-bit signed slice"))
    add(case("bits_stored_17_of_16", _with(base("bits_stored_17_of_16"), BitsStored=17, HighBit=16),
             MISMATCH, "unsupported_bits", what="BitsStored 17 > BitsAllocated 16"))
    add(case("bits_stored_zero", _with(base("bits_stored_zero"), BitsStored=0), MISMATCH,
             "unsupported_bits", what="BitsStored 0"))
    add(case("high_bit_inconsistent", _with(base("high_bit_inconsistent"), HighBit=3), SUCCESS,
             worker="ok", what="HighBit 3 with BitsStored 16 (HighBit is not used to decode)"))
    add(case("bits_allocated_8_16bit_data",
             _with(base("bits_allocated_8_16bit_data"), BitsAllocated=8, BitsStored=8, HighBit=7),
             MISMATCH, "bad_geometry",
             what="BitsAllocated 8 over 16-bit data: twice the bytes one frame needs"))

    # --- pixel representation --------------------------------------------------------------
    add(case("pixel_representation_2", _with(base("pixel_representation_2"), PixelRepresentation=2),
             SUCCESS, worker="undecodable", what="PixelRepresentation 2"))
    add(case("pixel_representation_missing",
             _with(base("pixel_representation_missing"), PixelRepresentation=None), SUCCESS,
             worker="undecodable", what="no PixelRepresentation"))
    add(case("unsigned_flag_on_signed_data",
             _with(base("unsigned_flag_on_signed_data", intercept=0.0), PixelRepresentation=0),
             SUCCESS, worker="ok",
             what="signed HU values flagged unsigned: air reads 64536 HU (undetectable)"))

    # --- photometric interpretation --------------------------------------------------------
    ds = base("rgb")
    ds.PixelData = np.random.default_rng(3).integers(0, 255, SIZE * SIZE * 3, np.uint8).tobytes()
    add(case("rgb", _with(ds, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
                          BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0),
             MISMATCH, "unsupported_photometric", what="RGB, 3 samples"))
    add(case("ybr_full", _with(base("ybr_full"), SamplesPerPixel=3, PhotometricInterpretation="YBR_FULL"),
             MISMATCH, "unsupported_photometric", what="YBR_FULL, 3 samples"))
    add(case("palette_color", _with(base("palette_color"), PhotometricInterpretation="PALETTE COLOR",
                                    PixelRepresentation=0),
             MISMATCH, "unsupported_photometric", what="PALETTE COLOR without a palette"))
    ds = base("photometric_empty")
    add(case("photometric_empty", ds, MISMATCH, "unsupported_photometric",
             raw={PHOTOMETRIC: element(PHOTOMETRIC, b"CS", b"")}, what="PhotometricInterpretation ''"))
    add(case("photometric_missing", _with(base("photometric_missing"), PhotometricInterpretation=None),
             MISMATCH, "unsupported_photometric", what="no PhotometricInterpretation"))
    add(case("monochrome2_three_samples", _with(base("monochrome2_three_samples"), SamplesPerPixel=3),
             MISMATCH, "unsupported_photometric", what="MONOCHROME2 with SamplesPerPixel 3"))
    add(case("samples_per_pixel_zero", _with(base("samples_per_pixel_zero"), SamplesPerPixel=0),
             MISMATCH, "unsupported_photometric", what="SamplesPerPixel 0"))
    add(case("monochrome1", _with(base("monochrome1"), PhotometricInterpretation="MONOCHROME1"),
             SUCCESS, worker="ok", what="MONOCHROME1 (HU come from the rescale, not the display)"))

    # --- rescale ---------------------------------------------------------------------------
    def rescale(name: str, slope: str | None = None, intercept: str | None = None):
        raw = {}
        if slope is not None:
            raw[RESCALE_SLOPE] = element(RESCALE_SLOPE, b"DS", text(slope))
        if intercept is not None:
            raw[RESCALE_INTERCEPT] = element(RESCALE_INTERCEPT, b"DS", text(intercept))
        return base(name), raw

    for name, slope, intercept, worker, what in (
        ("slope_garbage", "abc", None, "undecodable", "RescaleSlope 'abc'"),
        ("intercept_garbage", None, "-1O24", "undecodable", "RescaleIntercept '-1O24' (letter O)"),
        ("slope_nan", "NaN", None, "undecodable", "RescaleSlope 'NaN'"),
        ("intercept_inf", None, "inf", "undecodable", "RescaleIntercept 'inf'"),
        ("slope_negative", "-1", None, "ok", "RescaleSlope -1 (inverted, still an image)"),
        ("slope_zero", "0", None, "blank", "RescaleSlope 0: every pixel the intercept"),
        ("slope_1e36", "1e36", None, "undecodable", "RescaleSlope 1e36: some HU overflow float32"),
        ("slope_1e38", "1e38", None, "undecodable", "RescaleSlope 1e38: every HU overflows"),
        ("intercept_1e39", None, "1e39", "undecodable", "RescaleIntercept 1e39: inf in float32"),
        ("slope_empty", "", None, "ok", "RescaleSlope '' (default 1)"),
    ):
        ds, raw = rescale(name, slope, intercept)
        add(case(name, ds, SUCCESS, worker=worker, raw=raw, what=what))
    ds = base("padding_covers_all", signed=False, intercept=-1024.0)
    ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = 0, 65535
    add(case("padding_covers_all", ds, SUCCESS, worker="blank",
             what="PixelPaddingValue..RangeLimit 0..65535: every pixel is padding"))

    # --- UIDs ------------------------------------------------------------------------------
    add(case("sop_instance_uid_missing", _with(base("sop_instance_uid_missing"), SOPInstanceUID=None),
             MISMATCH, "missing_uid", sop_instance=uid("sop_instance_uid_missing"),
             what="no SOP Instance UID in the data set"))
    add(case("study_uid_missing", _with(base("study_uid_missing"), StudyInstanceUID=None),
             MISMATCH, "missing_uid", what="no Study Instance UID"))
    add(case("series_uid_blank", base("series_uid_blank"), MISMATCH, "missing_uid",
             raw={SERIES_UID: element(SERIES_UID, b"UI", b"")}, what="Series Instance UID empty"))
    add(case("sop_uids_missing", _with(base("sop_uids_missing"), SOPInstanceUID=None, SOPClassUID=None),
             CANNOT_UNDERSTAND, "undecodable", sop_instance=uid("sop_uids_missing"),
             what="neither SOP Class nor SOP Instance UID"))
    add(case("sop_instance_uid_mismatch", base("sop_instance_uid_mismatch"), MISMATCH,
             "uid_mismatch", sop_instance=uid("something else"),
             what="request's Affected SOP Instance UID differs from the data set's"))
    add(case("sop_class_mismatch", _with(base("sop_class_mismatch"), SOPClassUID=MRImageStorage),
             MISMATCH, "sop_class_mismatch", what="data set says MR Image Storage, sent as CT"))
    add(case("unknown_sop_class_in_data_set",
             _with(base("unknown_sop_class_in_data_set"), SOPClassUID=UNKNOWN_SOP_CLASS),
             MISMATCH, "sop_class_mismatch", what="data set's SOP Class UID is unregistered"))
    add(case("unknown_sop_class_context",
             _with(base("unknown_sop_class_context"), SOPClassUID=UNKNOWN_SOP_CLASS), None,
             sop_class=UNKNOWN_SOP_CLASS, what="presentation context for an unregistered SOP class"))
    dup = base("good_0", hu=lesion_hu(SIZE, seed=7))  # good_0's SOP Instance UID, other pixels
    add(case("duplicate_sop_instance_uid", dup, SUCCESS, worker="ok",
             what="good_0's SOP Instance UID again, different pixels (both queued)"))

    # --- modality and SOP classes ----------------------------------------------------------
    add(case("modality_mr_in_ct_class", base("modality_mr_in_ct_class", modality="MR"), MISMATCH,
             "modality_not_ct", what="CT Image Storage with Modality MR"))
    add(case("modality_missing", _with(base("modality_missing"), Modality=None), MISMATCH,
             "modality_not_ct", what="CT Image Storage without Modality (Type 1)"))
    add(case("modality_lowercase", base("modality_lowercase", modality="ct"), SUCCESS, worker="ok",
             what="Modality 'ct'"))
    mr = _with(base("mr_image", modality="MR"), SOPClassUID=MRImageStorage)
    add(case("mr_image", mr, SUCCESS, "not_ct", sop_class=MRImageStorage, what="MR Image Storage"))
    sc = _with(base("secondary_capture", modality="OT"), SOPClassUID=SecondaryCaptureImageStorage)
    add(case("secondary_capture", sc, SUCCESS, "not_ct", sop_class=SecondaryCaptureImageStorage,
             what="Secondary Capture Image Storage"))
    sr = Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID = BasicTextSRStorage, uid("basic_text_sr")
    sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.Modality = STUDY, uid("sr series"), "SR"
    add(case("basic_text_sr", sr, SUCCESS, "non_image", sop_class=BasicTextSRStorage,
             what="Basic Text SR (no pixels)"))

    # --- transfer syntaxes -----------------------------------------------------------------
    ds = base("implicit_valid")
    add(case("implicit_valid", ds, SUCCESS, worker="ok", ts=ImplicitVRLittleEndian,
             what="valid slice, Implicit VR Little Endian"))
    ds = base("implicit_bytes_explicit_context")
    add(case("implicit_bytes_explicit_context", encode(ds, implicit=True), SUCCESS, worker="ok",
             sop_instance=ds.SOPInstanceUID,
             what="Implicit VR encoding sent on an Explicit VR context (pydicom detects it)"))
    ds = base("explicit_bytes_implicit_context")
    add(case("explicit_bytes_implicit_context", encode(ds), SUCCESS, worker="ok",
             sop_instance=ds.SOPInstanceUID, ts=ImplicitVRLittleEndian,
             what="Explicit VR encoding sent on an Implicit VR context (pydicom detects it)"))
    add(case("big_endian_context", base("big_endian_context"), None, ts=ExplicitVRBigEndian,
             what="Explicit VR Big Endian (retired) context"))
    # Deflated Explicit VR is not offered (unbounded inflation): every such context is refused.
    add(case("deflated_valid", base("deflated_valid"), None,
             ts=DeflatedExplicitVRLittleEndian, what="valid slice, Deflated Explicit VR"))
    ds = base("deflate_corrupt")
    add(case("deflate_corrupt", np.random.default_rng(4).bytes(4096), None,
             sop_instance=ds.SOPInstanceUID, ts=DeflatedExplicitVRLittleEndian,
             what="random bytes on a Deflated context"))
    ds = base("deflate_truncated")
    zipped = deflate(encode(ds))
    add(case("deflate_truncated", zipped[:len(zipped) // 2], None,
             sop_instance=ds.SOPInstanceUID, ts=DeflatedExplicitVRLittleEndian,
             what="a deflate stream cut in half"))
    ds = base("deflated_bytes_explicit_context")
    add(case("deflated_bytes_explicit_context", deflate(encode(ds)), CANNOT_UNDERSTAND,
             "undecodable", sop_instance=ds.SOPInstanceUID,
             what="deflated bytes on a plain Explicit VR context"))
    C.extend(deflate_bombs(bomb_bytes))
    for name, ts in (("rle_context_native_pixels", RLELossless),
                     ("j2k_context_native_pixels", JPEG2000Lossless)):
        add(case(name, base(name), SUCCESS, worker="undecodable", ts=ts,
                 what=f"native Pixel Data on a {UID(ts).name} context"))
    ds = base("jpeg_garbage_fragment")
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + np.random.default_rng(5).bytes(2000)])
    ds["PixelData"].VR = "OB"
    add(case("jpeg_garbage_fragment", ds, SUCCESS, worker="undecodable", ts=JPEGBaseline8Bit,
             raw={PIXEL_DATA: encapsulated(ds.PixelData)},
             what="JPEG Baseline context, encapsulated fragment of noise"))
    ds = base("rle_valid")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(RLELossless)
    add(case("rle_valid", ds, SUCCESS, worker="ok", ts=RLELossless,
             raw={PIXEL_DATA: encapsulated(ds.PixelData)}, what="valid slice, RLE Lossless"))
    ds = base("encapsulated_on_native_context")
    frames = encapsulate([bytes(3000)])
    add(case("encapsulated_on_native_context", ds, CANNOT_UNDERSTAND, "truncated",
             raw={PIXEL_DATA: encapsulated(frames)},
             what="encapsulated Pixel Data on an Explicit VR (native) context"))
    return C


def _nested_sequences(tag: int, depth: int) -> bytes:
    """`depth` nested sequences, each with one undefined-length item holding the next."""
    open_ = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ\0\0" + b"\xff\xff\xff\xff"
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close_item = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    close_seq = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return (open_ + item) * depth + (close_item + close_seq) * depth


def deflate_bombs(bomb_bytes: int = BOMB_BYTES) -> list[Case]:
    """Deflated Explicit VR data sets whose Pixel Data inflates to `bomb_bytes`: the first is
    a CT slice (a real 64x64 image followed by zeros), the second an MR image the listener
    would only ignore. What is a few hundred KiB on the wire must not cost hundreds of MiB."""
    out = []
    for name, sop_class, modality in (("deflate_bomb_ct", CTImageStorage, "CT"),
                                      ("deflate_bomb_mr", MRImageStorage, "MR")):
        ds = _with(base(name, modality=modality), SOPClassUID=sop_class)
        image = ds.PixelData
        head = encode(ds, raw={PIXEL_DATA: None})
        head += element(PIXEL_DATA, b"OW", image, length=len(image) + bomb_bytes)
        payload = deflate_bomb(head, bomb_bytes)
        # The listener does not offer Deflated Explicit VR: the bomb never reaches a decoder.
        out.append(case(name, payload, None, sop_class=sop_class,
                        sop_instance=ds.SOPInstanceUID, ts=DeflatedExplicitVRLittleEndian,
                        what=f"{len(payload) // 1024} KiB deflated → {bomb_bytes >> 20} MiB "
                             f"of Pixel Data ({modality}): context refused"))
    return out


def corpus(bomb_bytes: int = BOMB_BYTES, good_every: int = 8) -> list[Case]:
    """The hostile cases with a good slice before the first, after every `good_every`-th and
    after the last: one association carries all of it."""
    hostile = hostile_cases(bomb_bytes)
    goods = iter(good_slices(len(hostile) // good_every + 2))
    out = [next(goods)]
    for i, c in enumerate(hostile, 1):
        out.append(c)
        if i % good_every == 0:
            out.append(next(goods))
    out.append(next(goods))
    return out


if __name__ == "__main__":  # python -m tests.reliability.hostile: the corpus and its outcomes
    for c in hostile_cases():
        flag = f"  [{c.invariant}: known bug]" if c.bug else ""
        flag += "  [decoder: known bug]" if c.decoder_bug else ""
        print(f"{c.name:36s} {c.expected():50s} {c.what}{flag}")
