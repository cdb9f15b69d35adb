"""ich.imaging: exact HU decoding, the three windows, compressed syntaxes, every failure reason."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from ich import imaging
from ich.imaging import SliceError
from tests.ctfactory import ct_dataset, dcmtk_convert, head_hu, to_bytes


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path, f"pydicom's bundled test file {name} is missing"
    return path


# --- HU decoding -----------------------------------------------------------------------------

@pytest.mark.parametrize("signed, slope, intercept", [
    (True, 1.0, -1024.0),      # the common int16 case
    (False, 1.0, -1024.0),     # unsigned storage with intercept
    (True, 0.5, -1024.0),      # slope ≠ 1
    (True, 2.0, -1000.0),
])
def test_to_hu_inverts_rescale_exactly(signed, slope, intercept):
    hu = head_hu() // 2 * 2  # even values survive slope 2 exactly
    got = imaging.to_hu(ct_dataset(hu, signed=signed, slope=slope, intercept=intercept))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, hu)


def test_rsna_12bit_wrong_intercept_is_repaired():
    """RSNA 2019 defect: BitsStored 12, unsigned, intercept > -100, values wrapped mod 4096."""
    hu = head_hu()
    wrapped = np.mod(hu, 4096)
    ds = ct_dataset(hu, signed=False, intercept=0.0, bits_stored=12, stored=wrapped)
    np.testing.assert_array_equal(imaging.to_hu(ds), hu)
    # A naive reader would see air as +3096 HU: the defect is real and the fix is needed.
    assert ds.pixel_array.max() > 3000


def test_pixel_padding_becomes_air():
    hu = head_hu()
    ds = ct_dataset(hu)
    stored = ds.pixel_array.copy()
    stored[:4, :] = -2000
    ds.PixelData = stored.astype(np.int16).tobytes()
    ds.PixelPaddingValue = -2000
    got = imaging.to_hu(ds)
    assert (got[:4] == imaging.AIR_HU).all()
    np.testing.assert_array_equal(got[4:], hu[4:])


def test_padding_value_read_back_from_a_file_matches_signed_pixels():
    ds = ct_dataset(head_hu())
    stored = ds.pixel_array.copy()
    stored[:2] = -2000
    ds.PixelData = stored.tobytes()
    ds.PixelPaddingValue = -2000
    reread = imaging.read_dataset(to_bytes(ds))
    assert (imaging.to_hu(reread)[:2] == imaging.AIR_HU).all()


def test_multivalued_window_fields_and_monochrome1_do_not_change_decoding():
    hu = head_hu()
    plain = imaging.load_slice(ct_dataset(hu), 32)
    ds = ct_dataset(hu)
    ds.WindowCenter, ds.WindowWidth = [40, 80, 600], [80, 200, 2800]
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(imaging.load_slice(ds, 32), plain)


# --- windows and resize ----------------------------------------------------------------------

def test_windows_are_clipped_linear_ramps_in_model_order():
    hu = np.array([[-1000, 0, 40, 80, 1000]], dtype=np.float32)
    out = imaging.windows(hu)
    assert out.shape == (1, 5, 3) and out.dtype == np.float32
    brain, subdural, soft = out[0, :, 0], out[0, :, 1], out[0, :, 2]
    np.testing.assert_allclose(brain, [0, 0, 0.5, 1, 1])              # L40/W80
    np.testing.assert_allclose(subdural, [0, 0.1, 0.3, 0.5, 1])       # L80/W200
    np.testing.assert_allclose(soft, [0, 150 / 380, 190 / 380, 230 / 380, 1], rtol=1e-6)


def test_resize_preserves_constant_and_mean_and_shape():
    img = np.full((512, 512), 37.0, dtype=np.float32)
    np.testing.assert_allclose(imaging.resize(img, 224), 37.0, rtol=1e-5)
    rng = np.random.default_rng(1)
    img = rng.normal(0, 100, (512, 384)).astype(np.float32)
    small = imaging.resize(img, 75)
    assert small.shape == (75, 75) and small.dtype == np.float32
    assert abs(small.mean() - img.mean()) < 1.0


def test_resize_keeps_a_bright_spot_where_it_was():
    img = np.zeros((512, 512), dtype=np.float32)
    img[300:310, 100:110] = 100
    small = imaging.resize(img, 128)
    y, x = np.unravel_index(np.argmax(small), small.shape)
    assert 74 <= y <= 78 and 24 <= x <= 28


def test_load_slice_shape_range_and_upscale():
    out = imaging.load_slice(to_bytes(ct_dataset(head_hu(64))), 75)
    assert out.shape == (75, 75, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() > 0.9


def test_bytes_path_and_dataset_sources_agree(tmp_path):
    ds = ct_dataset(head_hu())
    path = tmp_path / "x.dcm"
    path.write_bytes(to_bytes(ds))
    a = imaging.load_slice(to_bytes(ds), 48)
    np.testing.assert_array_equal(a, imaging.load_slice(path, 48))
    np.testing.assert_array_equal(a, imaging.load_slice(str(path), 48))
    np.testing.assert_array_equal(a, imaging.load_slice(ds, 48))


def test_pydicom_bundled_ct_files_decode_to_plausible_hu():
    for name in ("CT_small.dcm", "693_J2KI.dcm"):  # explicit VR; JPEG 2000 lossy CT 512²
        hu = imaging.to_hu(pydicom.dcmread(bundled(name)))
        assert hu.min() < -500 and 0 < np.median(hu[hu > -200]) < 200, name


# --- compressed transfer syntaxes ------------------------------------------------------------

LOSSLESS = {
    "jpeg_lossless_sv1": ("dcmcjpeg", ["+e1"]),
    "jpeg_ls_lossless": ("dcmcjpls", ["+el"]) ,
    "rle": ("dcmcrle", []),
}


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_compressed_by_dcmtk_decodes_exactly(name, tmp_path):
    tool, args = LOSSLESS[name]
    hu = head_hu(96)
    ds = ct_dataset(hu)
    compressed = dcmtk_convert(tool, args, ds, tmp_path)
    assert compressed.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(imaging.to_hu(compressed), hu)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless])
def test_lossless_compressed_by_pydicom_decodes_exactly(syntax):
    hu = head_hu(96)
    ds = ct_dataset(hu)
    ds.compress(syntax, encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless else "")
    reread = imaging.read_dataset(to_bytes(ds))
    assert reread.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(imaging.to_hu(reread), hu)


@pytest.mark.parametrize("args, bits", [(["+eb"], 8), (["+ee"], 12)])
def test_lossy_jpeg_baseline_and_extended_decode_close(args, bits, tmp_path):
    """Baseline is 8-bit and extended 12-bit: store HU shifted into that range, unsigned."""
    hu = np.clip(head_hu(96), -100, 150) if bits == 8 else np.clip(head_hu(96), -1000, 3000)
    intercept = float(hu.min())
    ds = ct_dataset(hu, signed=False, intercept=intercept, bits_stored=bits)
    if bits == 8:
        ds.BitsAllocated = 8
        ds.PixelData = (hu - intercept).astype(np.uint8).tobytes()
    compressed = dcmtk_convert("dcmcjpeg", args, ds, tmp_path)
    got = imaging.to_hu(compressed)
    assert np.median(np.abs(got - hu)) <= (2 if bits == 8 else 8)


def test_deflated_explicit_vr_decodes(tmp_path):
    hu = head_hu()
    ds = ct_dataset(hu)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(imaging.to_hu(imaging.read_dataset(to_bytes(ds))), hu)


# --- every failure reason --------------------------------------------------------------------

def _reason(source, **kw) -> str:
    with pytest.raises(SliceError) as info:
        imaging.load_slice(source, 32, **kw)
    assert info.value.reason in imaging.REASONS
    return info.value.reason


def test_not_dicom_is_undecodable():
    assert _reason(b"GET / HTTP/1.1\r\n\r\n" * 20) == "undecodable"
    assert _reason(b"") == "undecodable"


def test_corrupt_compressed_stream_is_undecodable(tmp_path):
    ds = dcmtk_convert("dcmcjpeg", ["+e1"], ct_dataset(head_hu(96)), tmp_path)
    soi = ds.PixelData.index(b"\xff\xd8")  # JPEG start-of-image marker: destroy the headers
    ds.PixelData = ds.PixelData[:soi] + b"\x12\x34" * 40 + ds.PixelData[soi + 80:]
    assert _reason(to_bytes(ds)) in {"undecodable", "truncated"}


def test_truncated_file_and_truncated_pixel_data():
    data = to_bytes(ct_dataset(head_hu()))
    assert _reason(data[: len(data) - 100]) == "truncated"
    assert _reason(bundled("MR_truncated.dcm"), require_ct=False) == "truncated"


@pytest.mark.parametrize("cut, reason", [
    (100, "undecodable"),     # inside the preamble: no 'DICM' prefix
    (300, "truncated"),       # inside the file meta: no data set at all
    (600, "no_pixel_data"),   # inside the data set: pydicom keeps what it read
])
def test_file_cut_inside_the_header(cut, reason):
    assert _reason(to_bytes(ct_dataset(head_hu()))[:cut]) == reason


def test_not_ct_and_bundled_compressed_mr_decodes_when_allowed():
    path = bundled("MR_small_RLE.dcm")
    assert _reason(path) == "not_ct"
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        plain = imaging.to_hu(pydicom.dcmread(bundled("MR_small.dcm")))
        np.testing.assert_array_equal(imaging.to_hu(pydicom.dcmread(bundled(name))), plain)


def test_no_pixel_data():
    ds = ct_dataset(head_hu())
    del ds.PixelData
    assert _reason(ds) == "no_pixel_data"


def test_bad_geometry_and_too_large_fail_before_allocating():
    ds = ct_dataset(head_hu())
    ds.Rows = 0
    assert _reason(ds) == "bad_geometry"
    ds = ct_dataset(head_hu())
    ds.Rows = ds.Columns = 65535  # a hostile header must not allocate 8 GB
    assert _reason(ds) == "too_large"


def test_multi_frame():
    ds = ct_dataset(head_hu())
    ds.NumberOfFrames = 2
    assert _reason(ds) == "multi_frame"


def test_colour_is_unsupported_photometric():
    assert _reason(bundled("SC_rgb_rle.dcm"), require_ct=False) == "unsupported_photometric"
    ds = ct_dataset(head_hu())
    ds.PhotometricInterpretation = "PALETTE COLOR"
    assert _reason(ds) == "unsupported_photometric"


def test_unsupported_bits():
    ds = ct_dataset(head_hu())
    ds.BitsAllocated = 12
    assert _reason(ds) == "unsupported_bits"
    ds = ct_dataset(head_hu())
    ds.BitsStored = 20
    assert _reason(ds) == "unsupported_bits"


def test_constant_image_is_blank_not_scored_as_normal():
    assert _reason(ct_dataset(np.zeros((32, 32), dtype=np.int32))) == "blank"


def test_non_numeric_rescale_is_undecodable():
    ds = ct_dataset(head_hu())
    with pytest.warns(UserWarning, match="Invalid value for VR DS"):
        ds.RescaleIntercept = "nan"
    assert _reason(ds) == "undecodable"
