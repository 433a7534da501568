"""Benchmark of ``dicom2png``: files/s with and without text detection, and masking on clean images.

1. Builds N ultrasound DICOMs (default 200) from liver-sysu PNGs, with patient text burned
   into the border bands (and into the scan area of every third file), half of them with a
   Sequence of Ultrasound Regions; converts them with and without text detection and reports
   files/s, plus how much of the drawn text was masked.
2. Runs the text masking on every clean liver-sysu PNG and reports the masked-area fraction
   and every box it kept.

Usage: python benchmarks/bench_dicom.py [--files 200] [--workers 2] [--out benchmarks/results/dicom.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from importlib.metadata import version
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dicom_fixtures import LIVER_DIR, Patient, liver_pngs, make_us_case, read_png  # noqa: E402

from hsqformer.dicom.convert import ConvertOptions, convert_tree  # noqa: E402
from hsqformer.dicom.text_masking import RapidOCRDetector, TextCandidate, TextRules, confirmed_text  # noqa: E402

class _RecordingDetector:
    """The PP-OCR detector, remembering its raw proposals so they can be compared with the kept ones."""

    def __init__(self) -> None:
        self.inner = RapidOCRDetector(threads=1)
        self.last: list[TextCandidate] = []

    def find(self, image_bgr: np.ndarray) -> list[TextCandidate]:
        self.last = self.inner.find(image_bgr)
        return self.last


_detector: _RecordingDetector | None = None


def _init() -> None:
    global _detector
    _detector = _RecordingDetector()


def _area(boxes: list[tuple[int, int, int, int]], shape: tuple[int, ...]) -> int:
    mask = np.zeros(shape[:2], dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, y0) : y1, max(0, x0) : x1] = True
    return int(mask.sum())


def _clean_boxes(path: str) -> tuple[str, int, list[tuple[tuple[int, int, int, int], str]], int, int]:
    """Kept text boxes of one clean PNG (same rules and padding as dicom2png), masked and raw-proposal pixel counts."""
    image = read_png(Path(path))
    kept = confirmed_text(image, _detector, TextRules())
    raw = _area([c.box for c in _detector.last], image.shape)
    return path, image.shape[0] * image.shape[1], [(c.box, c.text) for c in kept], _area([c.box for c in kept], image.shape), raw


def build_batch(in_dir: Path, count: int) -> list:
    pngs = liver_pngs()
    step = max(1, len(pngs) // count)
    cases = []
    for i, png in enumerate(pngs[::step][:count]):
        patient = Patient(name=f"TESTPATIENT^NO{i % 50}", patient_id=f"PID{100000 + i % 50}")
        path = in_dir / png.parent.name / f"img{i:04d}.dcm"
        cases.append(make_us_case(png, path, patient, with_region=i % 2 == 0, text_in_scan=i % 3 == 0))
    return cases


def text_coverage(cases: list, in_dir: Path, out_dir: Path, key: Path) -> float:
    entries = {e["source"]: e for e in json.loads(key.read_text())["images"]}
    drawn = covered = 0
    for case in cases:
        out = read_png(out_dir / entries[case.path.relative_to(in_dir).as_posix()]["path"])
        x0, y0, x1, y1 = case.region or (0, 0, case.frame.shape[1], case.frame.shape[0])
        text = case.text_mask[y0:y1, x0:x1]
        drawn += int(text.sum())
        covered += int((~np.any(out[text] != 0, axis=-1)).sum())
    return covered / drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dicom.md")
    args = parser.parse_args()
    if not LIVER_DIR.is_dir():  # the tests' stand-ins for a clone would give meaningless numbers here
        parser.error(f"needs the liver-sysu images in {LIVER_DIR}")

    lines = [
        "# dicom2png benchmark",
        "",
        f"- Command: `python benchmarks/bench_dicom.py --files {args.files} --workers {args.workers}`",
        f"- Date: {date.today()}; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"(shared with other jobs: 1-min load average {os.getloadavg()[0]:.1f} at start), Python {platform.python_version()}",
        "- Versions: " + ", ".join(f"{p} {version(p)}" for p in ("pydicom", "pylibjpeg", "rapidocr-onnxruntime", "onnxruntime", "opencv-python-headless", "numpy")),
        f"- Text rules: {TextRules()}",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = build_batch(root / "in", args.files)
        frames = [c.frame.shape for c in cases]
        lines += [
            f"## Batch of {len(cases)} ultrasound DICOMs (RGB, uncompressed, "
            f"{min(f[1] for f in frames)}x{min(f[0] for f in frames)} to {max(f[1] for f in frames)}x{max(f[0] for f in frames)} px)",
            "",
            "Wall time includes starting the worker processes (spawned; each imports the package and, with",
            "detection, loads the PP-OCR models). Drawn-text pixels masked: of the pixels changed by the",
            "burned-in patient text that remain in the output (after cropping), the share blacked out.",
            "",
            "| text detection | workers | wall s | files/s | masked regions | drawn-text pixels masked |",
            "|---|---|---|---|---|---|",
        ]
        for detect in (False, True):
            out, key = root / f"out_{detect}", root / f"key_{detect}.json"
            start = time.perf_counter()
            summary = convert_tree(root / "in", out, ConvertOptions(salt="bench", detect_text=detect), workers=args.workers, key_file=key)
            wall = time.perf_counter() - start
            assert summary.failed == 0, summary
            coverage = text_coverage(cases, root / "in", out, key)
            lines.append(
                f"| {'on' if detect else 'off'} | {args.workers} | {wall:.1f} | {len(cases) / wall:.2f} | {summary.masked_regions} | {coverage:.2%} |"
            )
            print(lines[-1], flush=True)

    pngs = liver_pngs()
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_init) as pool:
        results = list(pool.map(_clean_boxes, [str(p) for p in pngs], chunksize=8))
    wall = time.perf_counter() - start
    total = sum(r[1] for r in results)
    masked = sum(r[3] for r in results)
    raw = sum(r[4] for r in results)
    hit = [r for r in results if r[2]]
    lines += [
        "",
        f"## Clean liver-sysu images ({len(pngs)} PNGs, {wall:.0f} s)",
        "",
        f"- Masked pixels over the whole set: {masked} of {total} = **{masked / total:.5%}**",
        f"- For comparison, masking every raw PP-OCR proposal (no confirmation) would cover {raw / total:.3%}"
        f" ({sum(1 for r in results if r[4])} images touched)",
        f"- Images with any masked box: {len(hit)} of {len(pngs)}; boxes: {sum(len(r[2]) for r in hit)};"
        f" largest box: {max(((b[2] - b[0]) * (b[3] - b[1]) for r in hit for b, _ in r[2]), default=0)} px",
        "- The set was cropped of burned-in text before release; what is left is scanner marks, listed",
        "  below with the text read in each kept box.",
        "",
        "| image | kept boxes (x0, y0, x1, y1): text read |",
        "|---|---|",
    ]
    lines += [f"| {Path(r[0]).parent.name}/{Path(r[0]).name} | {'; '.join(f'{b}: `{t}`' for b, t in r[2])} |" for r in hit]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[-len(hit) - 8 :]))


if __name__ == "__main__":
    main()
