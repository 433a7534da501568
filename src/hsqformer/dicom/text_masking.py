"""Finding burned-in text and blacking it out, without touching anatomy.

A :class:`TextDetector` proposes :class:`TextCandidate` boxes with the text it read
in them; :class:`TextRules` then keeps only candidates that look like text: a
confident reading with enough letters or digits, in a box of text-like height and
shape. The raw PP-OCR detector also fires on liver texture and body-marker icons;
those proposals are large, square-ish and read as nothing or as a single glyph with
low confidence, and the rules drop them. Any detector with the same ``find`` method
can replace :class:`RapidOCRDetector`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from hsqformer.dicom.pixels import Box


@dataclass(frozen=True)
class TextCandidate:
    """A proposed text box with what was read in it."""

    box: Box
    text: str
    score: float


class TextDetector(Protocol):
    """Anything that proposes text boxes in an 8-bit BGR image."""

    def find(self, image_bgr: np.ndarray) -> list[TextCandidate]:
        """Candidate text boxes, in pixel coordinates of ``image_bgr``."""
        ...


@dataclass(frozen=True)
class TextRules:
    """What a candidate needs to count as burned-in text.

    Defaults were set on the clean liver-sysu images (see benchmarks/results/dicom.md):
    real overlay text there ("10", "iQ") reads at >= 0.7 confidence in boxes under 5 %
    of the image height; icon and tissue proposals are taller or read as one glyph.
    """

    min_score: float = 0.5
    min_chars: int = 2
    max_height_fraction: float = 0.06
    min_aspect: float = 0.8
    pad: int = 2

    def accepts(self, candidate: TextCandidate, image_height: int) -> bool:
        """True when ``candidate`` is confident, long enough and text-shaped."""
        x0, y0, x1, y1 = candidate.box
        height, width = y1 - y0, x1 - x0
        if height <= 0 or width <= 0:
            return False
        chars = sum(ch.isalnum() for ch in candidate.text)
        return (
            candidate.score >= self.min_score
            and chars >= self.min_chars
            and height <= self.max_height_fraction * image_height
            and width / height >= self.min_aspect
        )


class RapidOCRDetector:
    """PP-OCR text detection and recognition (rapidocr-onnxruntime; models ship in the wheel).

    Load once per process: building the ONNX sessions takes about a second.
    """

    def __init__(self, threads: int = 1) -> None:
        from rapidocr_onnxruntime import RapidOCR

        self._engine = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1, print_verbose=False)

    def find(self, image_bgr: np.ndarray) -> list[TextCandidate]:
        """Every detected box with its recognised text (no score threshold: rules decide)."""
        result, _ = self._engine(image_bgr, use_cls=False, text_score=0.0)
        candidates = []
        for points, text, score in result or []:
            pts = np.asarray(points, dtype=np.float32)
            x0, y0 = np.floor(pts.min(axis=0)).astype(int)
            x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
            candidates.append(TextCandidate((int(x0), int(y0), int(x1), int(y1)), str(text), float(score)))
        return candidates


def detector_input(image: np.ndarray) -> np.ndarray:
    """An 8-bit BGR view of a PNG-ready frame (grey, RGB, 8- or 16-bit) for the detector."""
    if image.dtype != np.uint8:
        peak = int(image.max()) or 1
        image = (image.astype(np.float32) * (255.0 / peak)).round().astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(image, cv2.COLOR_RGB2BGR)


def confirmed_text(image: np.ndarray, detector: TextDetector, rules: TextRules) -> list[TextCandidate]:
    """Candidates that pass ``rules``, their boxes padded by ``rules.pad`` and clipped to the image."""
    height, width = image.shape[:2]
    kept = []
    for candidate in detector.find(detector_input(image)):
        if rules.accepts(candidate, height):
            x0, y0, x1, y1 = candidate.box
            box = (max(0, x0 - rules.pad), max(0, y0 - rules.pad), min(width, x1 + rules.pad), min(height, y1 + rules.pad))
            kept.append(TextCandidate(box, candidate.text, candidate.score))
    return kept


def confirmed_text_boxes(image: np.ndarray, detector: TextDetector, rules: TextRules) -> list[Box]:
    """Boxes of :func:`confirmed_text`."""
    return [candidate.box for candidate in confirmed_text(image, detector, rules)]


def black_out(image: np.ndarray, boxes: list[Box]) -> int:
    """Set the pixels of ``boxes`` to 0 in place; returns how many pixels are now masked."""
    mask = np.zeros(image.shape[:2], dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    image[mask] = 0
    return int(mask.sum())
