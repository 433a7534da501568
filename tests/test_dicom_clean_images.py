"""Text masking must leave clean ultrasound alone: masked area on liver-sysu images stays near zero.

The full 508-image measurement is in benchmarks/bench_dicom.py; this checks a spread-out subset.
"""

from __future__ import annotations

import numpy as np
import pytest
from dicom_fixtures import liver_pngs, read_png
from shared_data import requires_shared_data

from hsqformer.dicom.text_masking import RapidOCRDetector, TextCandidate, TextRules, confirmed_text_boxes

SUBSET = 30


@pytest.fixture(scope="module")
def detector() -> RapidOCRDetector:
    return RapidOCRDetector(threads=1)


@requires_shared_data
def test_masked_fraction_on_clean_liver_images_is_near_zero(detector) -> None:
    pngs = liver_pngs()
    subset = pngs[:: len(pngs) // SUBSET][:SUBSET]
    total = masked = 0
    for png in subset:
        image = read_png(png)
        mask = np.zeros(image.shape[:2], dtype=bool)
        for x0, y0, x1, y1 in confirmed_text_boxes(image, detector, TextRules()):
            mask[y0:y1, x0:x1] = True
        total += mask.size
        masked += int(mask.sum())
    assert masked / total < 0.002


def test_rules_reject_icon_and_tissue_shaped_proposals() -> None:
    rules = TextRules()
    assert rules.accepts(TextCandidate((10, 10, 120, 26), "ID 12345", 0.95), image_height=600)
    assert not rules.accepts(TextCandidate((200, 200, 445, 500), "W", 0.9), image_height=600)  # tissue-sized
    assert not rules.accepts(TextCandidate((10, 10, 120, 88), "AB", 0.81), image_height=700)  # body-marker icon
    assert not rules.accepts(TextCandidate((10, 10, 40, 26), "1", 0.99), image_height=600)  # one glyph
    assert not rules.accepts(TextCandidate((10, 10, 120, 26), "Mr", 0.43), image_height=600)  # unsure reading
    assert not rules.accepts(TextCandidate((10, 10, 18, 26), "10", 0.99), image_height=600)  # taller than wide
