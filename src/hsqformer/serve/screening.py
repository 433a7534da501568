"""Screening with a finished cv run: probabilities, decisions at the operating point, heat maps.

No web code here, so that the page's handlers (:mod:`hsqformer.serve.app`) stay thin and all of
this is tested without a server. The probability is computed as ``hsqformer predict`` computes
``prob_ensemble``: the run's evaluation preprocessing, each fold model's softmax in float32, their
mean, the positive class's column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from hsqformer.errors import HSQformerError
from hsqformer.serve.card import ModelCard, model_card
from hsqformer.serve.uploads import ScanImage, UploadError, quiet_dicom_log, read_upload
from hsqformer.training.inference import RunEnsemble, load_ensemble

#: Images per forward pass in a batch, and the most a batch holds decoded at once.
BATCH_SIZE = 16
CSV_COLUMNS = ("file", "probability", "decision", "threshold", "note", "error")


@dataclass(frozen=True)
class Screening:
    """The result for one image; ``heatmap`` is the overlay, None when it could not be made (``heatmap_note``
    says why)."""

    scan: ScanImage
    probability: float
    decision: str
    positive: bool
    heatmap: Image.Image | None = None
    heatmap_note: str = ""


class Screener:
    """A run's fold ensemble, its model card and the text detector for DICOM uploads, loaded once per server."""

    def __init__(self, run: str | Path, method: str = "gradcam", *, detect_text: bool = True) -> None:
        """Load the run (one-line errors for an unfinished or foreign folder) and check ``method``."""
        from hsqformer.explain import METHODS

        if method not in METHODS:
            raise HSQformerError(f"unknown heatmap method '{method}'; choose one of {', '.join(METHODS)}")
        self.card: ModelCard = model_card(run)
        self.ensemble: RunEnsemble = load_ensemble(run)
        if method == "attention":
            from hsqformer.explain.attention import attention_stages

            attention_stages(self.ensemble.models[0])  # a run without query stages: one line now, not per image
        self.method = method
        quiet_dicom_log()
        self.detector = None
        if detect_text:
            from hsqformer.dicom.text_masking import RapidOCRDetector

            self.detector = RapidOCRDetector(threads=1)

    @torch.inference_mode()
    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The ensemble's positive-class probability of each image (float32, as predict's ``prob_ensemble``)."""
        out = []
        for start in range(0, len(images), BATCH_SIZE):
            batch = torch.stack([self.ensemble.transform(image) for image in images[start : start + BATCH_SIZE]])
            per_model = [model(batch).float().softmax(dim=1).cpu().numpy() for model in self.ensemble.models]
            out.append(np.stack(per_model).mean(axis=0)[:, self.ensemble.positive_index])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def screen_file(self, path: Path, name: str) -> Screening:
        """Screen one upload (a multi-frame DICOM: its first frame) with its heat map; UploadError if unreadable."""
        scan = read_upload(path, name, self.detector, frames="first")[0]
        probability = float(self.probabilities([scan.image])[0])
        heatmap, note = self._heatmap(scan)
        return Screening(
            scan, probability, self.card.decision(probability), self.card.is_positive(probability), heatmap, note
        )

    def screen_files(
        self, files: Sequence[tuple[Path, str]], progress: Callable[[float, str], None] | None = None
    ) -> pd.DataFrame:
        """One CSV row per image of ``files`` (every frame of a multi-frame DICOM), columns ``CSV_COLUMNS``;
        a file that cannot be read gets a row with its message in ``error`` and no probability. Images are
        scored ``BATCH_SIZE`` at a time as they are read, so that only that many are held in memory."""
        rows: list[dict[str, object]] = []
        pending: list[tuple[int, ScanImage]] = []

        def score_pending() -> None:
            for (row, _), probability in zip(pending, self.probabilities([s.image for _, s in pending]), strict=True):
                rows[row].update(
                    probability=float(probability), decision=self.card.decision(float(probability)),
                    threshold=self.card.threshold,
                )
            pending.clear()

        for i, (path, name) in enumerate(files):
            if progress is not None:
                progress(i / max(len(files), 1), f"screening {name}")
            try:
                scans = read_upload(path, name, self.detector, frames="all")
            except UploadError as err:
                rows.append({"file": name, "note": "", "error": str(err)})
                continue
            for scan in scans:
                pending.append((len(rows), scan))
                rows.append({"file": scan.name, "note": scan.note, "error": ""})
                if len(pending) == BATCH_SIZE:
                    score_pending()
        score_pending()
        table = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
        table["probability"] = table["probability"].astype("float32")  # as predict's prob_ensemble
        return table

    def _heatmap(self, scan: ScanImage) -> tuple[Image.Image | None, str]:
        """The heat map overlay of ``scan``; a failure costs the map only, never the probability."""
        from hsqformer.explain import explain_image, overlay

        try:
            explanation = explain_image(self.ensemble, scan.image, name=scan.name, method=self.method)
            return overlay(scan.image, explanation.heatmap), f"{self.method} heat map of the fold ensemble"
        except HSQformerError as err:
            return None, f"no heat map: {err}"
        except Exception as err:  # a method that fails on this model must not hide the screening result
            return None, f"no heat map: {self.method} failed ({type(err).__name__}: {err})"
