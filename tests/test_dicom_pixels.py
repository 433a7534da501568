"""Decoding of pydicom's bundled test files: transfer syntaxes, photometric interpretations, frames."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from hsqformer.dicom.pixels import decode_frame, select_frames, ultrasound_region_box
from hsqformer.dicom.reader import Rejected, read_dicom


def bundled(name: str) -> Dataset:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with pydicom"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_dicom(path)


MR_REFERENCE = "MR_small.dcm"  # explicit VR little endian, signed 16-bit


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",  # RLE lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
        "MR_small_bigendian.dcm",  # explicit VR big endian
        "MR_small_implicit.dcm",  # implicit VR little endian
    ],
)
def test_lossless_syntaxes_decode_to_the_uncompressed_reference(name: str) -> None:
    expected = decode_frame(bundled(MR_REFERENCE), 0)
    got = decode_frame(bundled(name), 0)
    assert got.dtype == np.uint16 and got.shape == (64, 64)
    np.testing.assert_array_equal(got, expected)


def test_signed_data_is_shifted_into_the_unsigned_range_losslessly() -> None:
    ds = bundled(MR_REFERENCE)
    raw = ds.pixel_array.astype(np.int32)
    assert ds.PixelRepresentation == 1 and ds.BitsStored == 16
    np.testing.assert_array_equal(decode_frame(ds, 0).astype(np.int32), raw + 32768)


def test_monochrome1_is_inverted() -> None:
    mono2 = bundled(MR_REFERENCE)
    mono1 = bundled(MR_REFERENCE)
    mono1.PhotometricInterpretation = "MONOCHROME1"
    total = decode_frame(mono1, 0).astype(np.int64) + decode_frame(mono2, 0).astype(np.int64)
    assert np.all(total == 65535)


def test_rgb_jpeg_lossless_matches_rle() -> None:
    reference = decode_frame(bundled("SC_rgb_rle.dcm"), 0)
    np.testing.assert_array_equal(decode_frame(bundled("SC_rgb_jpeg_gdcm.dcm"), 0), reference)
    assert reference.shape == (100, 100, 3) and tuple(reference[5, 50]) == (255, 0, 0)


@pytest.mark.parametrize(
    "name",
    [
        "SC_ybr_full_422_uncompressed.dcm",  # YBR_FULL_422, uncompressed
        "SC_rgb_jpeg_dcmtk.dcm",  # YBR_FULL, JPEG baseline
        "SC_rgb_dcmtk_+eb+cy+np.dcm",  # YBR_FULL_422, JPEG baseline
        "SC_rgb_gdcm_KY.dcm",  # RGB, JPEG 2000
    ],
)
def test_ybr_and_lossy_colour_become_rgb(name: str) -> None:
    reference = decode_frame(bundled("SC_rgb_rle.dcm"), 0).astype(np.int16)
    got = decode_frame(bundled(name), 0)
    assert got.dtype == np.uint8 and got.shape == (100, 100, 3)
    # Lossy chroma coding allows small differences; a missed YBR->RGB conversion gives tens of levels.
    assert np.abs(got.astype(np.int16) - reference).mean() < 3


def test_jpeg2000_ybr_rct_ultrasound_becomes_rgb() -> None:
    ds = bundled("examples_jpeg2k.dcm")
    got = decode_frame(ds, 0)
    assert got.shape == (480, 640, 3) and got.dtype == np.uint8
    # A grey-scale ultrasound image: in RGB, R = G = B almost everywhere (in YBR, Cb = Cr = 128 instead).
    spread = got.max(axis=-1).astype(int) - got.min(axis=-1)
    assert (spread <= 2).mean() > 0.8 and got.max() > 200


def test_palette_colour_uses_the_lookup_table() -> None:
    ds = bundled("examples_palette.dcm")
    got = decode_frame(ds, 0)
    assert got.shape == (350, 800, 3) and got.dtype == np.uint16  # 16-bit LUT entries
    lut = np.frombuffer(ds.RedPaletteColorLookupTableData, dtype="<u2")
    first = int(ds.RedPaletteColorLookupTableDescriptor[1])
    index = ds.pixel_array[100, 400]
    assert got[100, 400, 0] == lut[max(0, index - first)]
    assert np.any(got[..., 0] != got[..., 1])


def test_jpeg_ls_near_lossless_8bit() -> None:
    got = decode_frame(bundled("JPEGLSNearLossless_08.dcm"), 0)
    assert got.dtype == np.uint8 and got.shape == (45, 10)


def test_rgb_16bit_stays_16bit() -> None:
    got = decode_frame(bundled("SC_rgb_rle_16bit.dcm"), 0)
    assert got.dtype == np.uint16 and got.shape == (100, 100, 3) and got.max() > 255


def test_multiframe_frames_are_decoded_one_by_one() -> None:
    ds = bundled("examples_ybr_color.dcm")  # 30-frame JPEG baseline YBR_FULL_422 cine
    frames = select_frames("all", int(ds.NumberOfFrames))
    assert frames == list(range(30))
    first, last = decode_frame(ds, 0), decode_frame(ds, 29)
    assert first.shape == last.shape == (240, 320, 3)
    assert not np.array_equal(first, last)
    assert select_frames("middle", 30) == [15] and select_frames("0,5,5,29", 30) == [0, 5, 29]
    with pytest.raises(Rejected, match="frame 30 requested"):
        select_frames("30", 30)


def test_32bit_and_undecodable_data_are_rejected_with_a_reason() -> None:
    with pytest.raises(Rejected, match="32-bit"):
        decode_frame(bundled("SC_rgb_rle_32bit.dcm"), 0)
    with pytest.raises(Rejected, match="cannot decode pixel data"):
        decode_frame(bundled("JPEG-lossy.dcm"), 0)  # corrupt JPEG extended stream


def _region(x0: int, y0: int, x1: int, y1: int, spatial: int = 1) -> Dataset:
    item = Dataset()
    item.RegionSpatialFormat = spatial
    item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
    return item


def test_region_box_is_the_union_of_2d_regions_clipped_to_the_frame() -> None:
    ds = Dataset()
    assert ultrasound_region_box(ds, 100, 200) is None
    ds.SequenceOfUltrasoundRegions = [_region(10, 20, 59, 79), _region(100, 10, 249, 70), _region(0, 85, 199, 99, spatial=3)]
    assert ultrasound_region_box(ds, 100, 200) == (10, 10, 200, 80)
    ds.SequenceOfUltrasoundRegions = [_region(300, 300, 400, 400)]
    assert ultrasound_region_box(ds, 100, 200) is None


def test_file_without_meta_header_is_read_with_its_detected_encoding(tmp_path) -> None:
    source = bundled("MR_small_implicit.dcm")
    reference = decode_frame(source, 0)
    source.file_meta = pydicom.dataset.FileMetaDataset()
    source.preamble = None
    path = tmp_path / "no_meta"
    pydicom.dcmwrite(path, source, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(decode_frame(read_dicom(path), 0), reference)
