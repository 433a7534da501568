"""Decoding DICOM frames into arrays that PNG stores losslessly, and cropping to the scan area.

Values are written as stored, never windowed or rescaled:
- 8-bit data gives 8-bit PNG, 9- to 16-bit data gives 16-bit PNG (values unchanged, so
  12-bit data occupies 0..4095);
- MONOCHROME1 is inverted (``2**BitsStored - 1 - value``) so that white means high signal,
  as in MONOCHROME2;
- signed data is shifted by ``2**(BitsStored - 1)`` into the unsigned range (order kept);
- YBR_FULL / YBR_FULL_422 (and the JPEG 2000 YBR_ICT / YBR_RCT) become RGB; PALETTE COLOR
  becomes RGB through its lookup table, at the table's bit depth;
- 1-bit data becomes 0/255 8-bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, pixel_array

from hsqformer.dicom.reader import Rejected

#: RegionSpatialFormat value of a 2D (B-mode) region in the Sequence of Ultrasound Regions.
_SPATIAL_2D = 1

Box = tuple[int, int, int, int]
"""(x0, y0, x1, y1) with x1, y1 exclusive."""


def frame_count(ds: Dataset) -> int:
    """Number of frames in the pixel data (1 for single-frame files)."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError) as err:
        raise Rejected("invalid NumberOfFrames") from err


def select_frames(spec: str, count: int) -> list[int]:
    """Frame indices chosen by ``spec``: ``all``, ``first``, ``middle``, ``last`` or ``0,5,10``.

    Indices are 0-based; any index beyond the file's frames rejects the file.
    """
    named = {"all": list(range(count)), "first": [0], "middle": [count // 2], "last": [count - 1]}
    if spec in named:
        return named[spec]
    indices = parse_frame_list(spec)
    beyond = [i for i in indices if i >= count]
    if beyond:
        raise Rejected(f"frame {beyond[0]} requested but the file has {count} frame(s)")
    return indices


def parse_frame_list(spec: str) -> list[int]:
    """Parse a comma-separated list of 0-based frame indices (ValueError when malformed)."""
    try:
        indices = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError as err:
        raise ValueError(f"frames must be all, first, middle, last or comma-separated indices, not {spec!r}") from err
    if not indices or indices[0] < 0:
        raise ValueError(f"frames must list non-negative indices, not {spec!r}")
    return indices


def decode_frame(ds: Dataset, index: int) -> np.ndarray:
    """Frame ``index`` as a PNG-ready array: (H, W) or (H, W, 3), uint8 or uint16."""
    bits_allocated = int(ds.BitsAllocated)
    if bits_allocated > 16:
        raise Rejected(f"{bits_allocated}-bit pixel data cannot be stored losslessly in PNG")
    try:
        arr = pixel_array(ds, index=index if frame_count(ds) > 1 else None, as_rgb=True)
    except Rejected:
        raise
    except Exception as err:
        raise Rejected(f"cannot decode pixel data ({type(err).__name__}: {err})") from err

    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as err:
            raise Rejected(f"cannot apply the palette colour table ({type(err).__name__})") from err
        return _as_unsigned(arr, int(ds.get("BitsStored") or bits_allocated), signed=False)
    if arr.ndim == 3 and int(ds.SamplesPerPixel) == 1:
        raise Rejected("unexpected frame shape")

    bits_stored = int(ds.get("BitsStored") or bits_allocated)
    if bits_allocated == 1:
        return (arr.astype(np.uint8) * 255).astype(np.uint8)
    arr = _as_unsigned(arr, bits_stored, signed=int(ds.get("PixelRepresentation") or 0) == 1)
    if photometric == "MONOCHROME1":
        peak = (1 << bits_stored) - 1
        arr = (peak - np.minimum(arr, peak)).astype(arr.dtype)
    return arr


def _as_unsigned(arr: np.ndarray, bits_stored: int, *, signed: bool) -> np.ndarray:
    target = np.uint8 if arr.dtype.itemsize == 1 else np.uint16
    if signed:
        return (arr.astype(np.int32) + (1 << (bits_stored - 1))).astype(target)
    return arr.astype(target, copy=False)


def ultrasound_region_box(ds: Dataset, height: int, width: int) -> Box | None:
    """Bounding box of the imaging regions in the Sequence of Ultrasound Regions (0018,6011).

    The union of the 2D regions is used (all regions when none is marked 2D), so a
    split-screen display keeps both panes. ``None`` when the sequence is absent or
    its bounds do not fall inside the frame.
    """
    regions: Sequence[Dataset] = ds.get("SequenceOfUltrasoundRegions") or []
    boxes_2d: list[Box] = []
    boxes_any: list[Box] = []
    for region in regions:
        try:
            x0, y0 = int(region.RegionLocationMinX0), int(region.RegionLocationMinY0)
            x1, y1 = int(region.RegionLocationMaxX1) + 1, int(region.RegionLocationMaxY1) + 1
        except (AttributeError, TypeError, ValueError):
            continue
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        if x1 <= x0 or y1 <= y0:
            continue
        boxes_any.append((x0, y0, x1, y1))
        if region.get("RegionSpatialFormat") == _SPATIAL_2D:
            boxes_2d.append((x0, y0, x1, y1))
    boxes = boxes_2d or boxes_any
    if not boxes:
        return None
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )
