"""Decode any ultrasound still (PNG, JPEG, BMP, TIFF; any bit depth or mode) to 8-bit RGB.

Scanners and PACS exports write grayscale, palette, RGBA and 16-bit images; a
model expects one format. 16-bit images are scaled by their bit range (a
12-bit image by 4095, a full 16-bit one by 65535) rather than clipped, which
would turn almost every pixel white.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from hsqformer.data.manifest import one_line
from hsqformer.errors import HSQformerError

_ALPHA_MODES = {"RGBA": "RGB", "LA": "L", "PA": "RGB", "La": "L", "RGBa": "RGB"}


def load_image(path: str | Path, where: str | None = None) -> Image.Image:
    """Open an image file as 8-bit RGB (decoding all of it); raise ``HSQformerError`` naming the file if it cannot.

    ``where`` (e.g. "row 6 of /data/x/data.csv") is added to the message.
    """
    at = f" ({where})" if where else ""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            image = to_rgb8(image)
    except FileNotFoundError:
        raise HSQformerError(f"image not found: {path}{at}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise HSQformerError(f"unreadable image {path}{at}: {one_line(err)}") from None
    except Exception as err:  # a malformed file can trip any decoder error; it is still just an unreadable image
        raise HSQformerError(f"unreadable image {path}{at}: {type(err).__name__}: {one_line(err)}") from None
    if image.width < 1 or image.height < 1:
        raise HSQformerError(f"unreadable image {path}{at}: size {image.width}x{image.height}")
    return image


def to_rgb8(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB (alpha dropped, deep images rescaled)."""
    if image.mode == "RGB":
        return image
    if image.mode in _ALPHA_MODES:
        return image.convert(_ALPHA_MODES[image.mode]).convert("RGB")
    if image.mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    pixels = np.asarray(image)
    if pixels.ndim == 3:
        pixels = pixels[..., :3]
    grey = Image.fromarray(_scale_to_uint8(pixels))
    return grey.convert("RGB")


def _scale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map integer pixels by the smallest bit depth (>= 8) that holds their maximum; floats by their range."""
    if np.issubdtype(pixels.dtype, np.floating):
        low, high = float(np.nanmin(pixels)), float(np.nanmax(pixels))
        scaled = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
        return np.round(np.nan_to_num(scaled) * 255).astype(np.uint8)
    pixels = np.clip(pixels.astype(np.int64), 0, None)
    peak = int(pixels.max(initial=0))
    bits = max(8, math.ceil(math.log2(peak + 1))) if peak else 8
    return np.round(pixels * (255.0 / (2**bits - 1))).astype(np.uint8)
