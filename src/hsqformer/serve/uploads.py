"""Uploaded files turned into the images the models see, with a one-line message for a file that cannot be.

An upload lives only for its request: :func:`received` moves it out of the web server's upload
folder into a ``tempfile.TemporaryDirectory`` that is removed when the request ends.

PNG and JPEG (and the other formats ``hsqformer predict`` reads: BMP, TIFF) are decoded by
:func:`hsqformer.data.images.load_image`, the function predict uses, so both give the same pixels.
A DICOM goes through the steps of ``hsqformer dicom2png`` in memory: decoding, crop to the scan
area of the Sequence of Ultrasound Regions, black-out of burned-in text; the frame is then encoded
as the PNG dicom2png would write and decoded as predict reads that PNG, so the app's probability
for a DICOM equals predict's on dicom2png's output. No header value is shown or kept: messages
about a DICOM are redacted of every textual header value, and pydicom's log (which can quote
them) is silenced by :func:`quiet_dicom_log`.
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset

from hsqformer.data.images import load_image, to_rgb8
from hsqformer.dicom.deidentify import header_text_values, redact
from hsqformer.dicom.pixels import decode_frame, frame_count, select_frames, ultrasound_region_box
from hsqformer.dicom.reader import NotAnImage, Rejected, read_dicom
from hsqformer.dicom.text_masking import TextDetector, TextRules, black_out, confirmed_text_boxes
from hsqformer.errors import HSQformerError

#: Pillow's names of the formats that ``hsqformer predict`` reads (its IMAGE_SUFFIXES).
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "BMP", "TIFF"})
ACCEPTED = "PNG, JPEG or DICOM"
_DICOM_MAGIC_OFFSET = 128


class UploadError(HSQformerError):
    """An uploaded file that cannot be screened; ``str(err)`` is the one-line message shown in the page."""


@dataclass(frozen=True)
class ScanImage:
    """One image of an upload, ready for the models."""

    name: str  # the uploaded file's name, with the frame for a multi-frame DICOM
    image: Image.Image  # 8-bit RGB, as hsqformer predict loads it
    kind: str  # "PNG", "JPEG", ..., or "DICOM"
    note: str  # what was done to it, e.g. "cropped to the scan area; 2 text regions blacked out"


@contextmanager
def received(paths: Sequence[str | Path]) -> Iterator[list[tuple[Path, str]]]:
    """Move uploaded files into a temporary folder of this request; yield ``(path, name)`` pairs.

    The folder and everything in it is removed when the block ends, whatever happens. Each file
    gets a sub-folder of its own, so that two uploads with one name do not collide; the upload
    folder's (now empty) per-file folder is removed too.
    """
    with tempfile.TemporaryDirectory(prefix="hsqformer-upload-") as folder:
        moved = []
        for i, path in enumerate(paths):
            source = Path(path)
            target = Path(folder) / str(i) / source.name
            target.parent.mkdir()
            try:
                shutil.move(source, target)
            except FileNotFoundError:  # already taken by an earlier request: read_upload says so
                pass
            try:
                source.parent.rmdir()
            except OSError:  # not empty (another upload of the same content) or already gone
                pass
            moved.append((target, source.name))
        yield moved


def read_upload(
    path: Path,
    name: str,
    detector: TextDetector | None,
    *,
    frames: str = "all",
    rules: TextRules = TextRules(),
) -> list[ScanImage]:
    """The images of one uploaded file (several for a multi-frame DICOM, as chosen by ``frames``:
    ``all``, ``first``, ...); :class:`UploadError` with a one-line message if it cannot be read.

    ``detector`` finds burned-in text in DICOM frames (None: no text masking).
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(_DICOM_MAGIC_OFFSET + 4)
    except FileNotFoundError:
        raise UploadError(f"{name}: the upload is no longer on the server; upload it again") from None
    except OSError as err:
        raise UploadError(f"{name}: cannot read the upload ({type(err).__name__})") from None
    if not head:
        raise UploadError(f"{name}: the file is empty")
    if head[_DICOM_MAGIC_OFFSET:] == b"DICM":
        return _read_dicom(path, name, detector, frames, rules)
    try:
        with Image.open(path) as probe:
            kind = str(probe.format)
    except Image.DecompressionBombError as err:
        raise UploadError(f"{name}: unreadable image: {err}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        kind = ""  # not an image Pillow knows: a DICOM without its preamble, or not an image at all
    if not kind:
        return _read_dicom(path, name, detector, frames, rules)
    if kind not in IMAGE_FORMATS:
        raise UploadError(f"{name}: {kind} images are not supported; upload {ACCEPTED}")
    try:
        image = load_image(path)
    except HSQformerError as err:
        raise UploadError(str(err).replace(str(path), name)) from None
    return [ScanImage(name, image, kind, "")]


def quiet_dicom_log() -> None:
    """Silence pydicom's log, whose warnings can quote header values (as dicom2png's workers do)."""
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def _read_dicom(path: Path, name: str, detector: TextDetector | None, frames: str, rules: TextRules) -> list[ScanImage]:
    values: set[str] = set()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dicom(path)
            values = header_text_values(ds)
            count = frame_count(ds)
            images = []
            for index in select_frames(frames, count):
                image, note = _dicom_frame(ds, index, detector, rules)
                label = name if count == 1 else f"{name} [frame {index + 1} of {count}]"
                images.append(ScanImage(label, image, "DICOM", note))
            return images
    except NotAnImage:
        raise UploadError(f"{name}: a DICOM directory (DICOMDIR) holds no image") from None
    except Rejected as err:
        reason = "not a PNG, JPEG or DICOM file" if str(err) == "not a DICOM file" else f"DICOM {err}"
        raise UploadError(f"{name}: {redact(reason, values)}") from None
    except Exception as err:  # any decoder can fail on a damaged file; it is still one bad upload
        reason = f"cannot convert this DICOM ({type(err).__name__}: {err})"
        raise UploadError(f"{name}: {redact(reason, values)}") from None


def _dicom_frame(ds: Dataset, index: int, detector: TextDetector | None, rules: TextRules) -> tuple[Image.Image, str]:
    """dicom2png's decode, crop and text black-out of one frame, as the RGB image predict would read from its PNG."""
    frame = decode_frame(ds, index)
    box = ultrasound_region_box(ds, frame.shape[0], frame.shape[1])
    if box is not None:
        x0, y0, x1, y1 = box
        frame = np.ascontiguousarray(frame[y0:y1, x0:x1])
    boxes = confirmed_text_boxes(frame, detector, rules) if detector is not None else []
    black_out(frame, boxes)
    png = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", png, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise Rejected("PNG encoding failed")
    with Image.open(io.BytesIO(encoded.tobytes())) as decoded:
        decoded.load()
        image = to_rgb8(decoded)
    steps = ["cropped to the scan area" if box is not None else "no scan area in the header: not cropped"]
    if detector is None:
        steps.append("burned-in text not searched")
    else:
        steps.append(f"{len(boxes)} burned-in text region{'s' if len(boxes) != 1 else ''} blacked out")
    return image, "; ".join(steps)
