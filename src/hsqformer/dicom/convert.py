"""Batch conversion of a DICOM folder into de-identified PNGs and a training manifest.

Layout of OUT_DIR:
- ``images/<pseudonym>.png`` (``<pseudonym>_f<frame>.png`` for multi-frame files);
- ``manifest.csv`` (``path,label,patient_id,center``; path relative to OUT_DIR), the
  dataset format of the training pipeline;
- ``report.csv``: per image, its size, bit depth, whether it was cropped and how many
  text regions (and what fraction of pixels) were masked;
- ``errors.csv``: ``path,reason`` for every input that failed (relative input path).
The optional key file (outside OUT_DIR) maps pseudonyms back to inputs and holds the salt.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset
from tqdm import tqdm

from hsqformer.dicom.deidentify import header_text_values, image_stem, patient_pseudonym, redact
from hsqformer.dicom.pixels import decode_frame, frame_count, parse_frame_list, select_frames, ultrasound_region_box
from hsqformer.dicom.reader import NotAnImage, Rejected, read_dicom
from hsqformer.dicom.text_masking import TextDetector, TextRules, black_out, confirmed_text_boxes
from hsqformer.errors import HSQformerError

MANIFEST_COLUMNS = ("path", "label", "patient_id", "center")
REPORT_COLUMNS = ("path", "frame", "height", "width", "bit_depth", "cropped", "masked_regions", "masked_fraction")
ERROR_COLUMNS = ("path", "reason")
IMAGE_DIR = "images"


@dataclass(frozen=True)
class ConvertOptions:
    """Settings of one conversion run (picklable: sent to every worker)."""

    salt: str
    frames: str = "all"
    detect_text: bool = True
    rules: TextRules = field(default_factory=TextRules)
    overwrite: bool = False
    label: str = ""
    label_from_parent: bool = False
    center: str = ""
    png_compression: int = 3


@dataclass
class FrameRecord:
    """One written PNG, as far as the frame itself tells."""

    path: str
    frame: int
    height: int
    width: int
    bit_depth: int
    cropped: bool
    masked_regions: int
    masked_fraction: float


@dataclass
class ImageRecord(FrameRecord):
    """One written PNG with its manifest fields; the last three go to the key file only."""

    label: str
    patient_id: str
    center: str
    source: str
    sop_instance_uid: str
    original_patient_id: str


@dataclass
class FileResult:
    """The outcome for one input file."""

    source: str
    images: list[ImageRecord] = field(default_factory=list)
    error: str = ""
    skipped: bool = False


@dataclass
class Summary:
    """Totals of a run, for the CLI's closing line."""

    files: int
    converted: int
    images: int
    masked_regions: int
    failed: int
    skipped: int


_detector: TextDetector | None = None


def _init_worker(detect_text: bool) -> None:
    """Per-process set-up: silence pydicom's log (it quotes header values) and load the detector once."""
    global _detector
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    cv2.setNumThreads(1)
    if detect_text and _detector is None:
        from hsqformer.dicom.text_masking import RapidOCRDetector

        _detector = RapidOCRDetector(threads=1)


def convert_file(path: Path, source: str, out_dir: Path, options: ConvertOptions, detector: TextDetector | None) -> FileResult:
    """Convert one input file; never raises for bad input (the reason goes to ``error``)."""
    result = FileResult(source=source)
    values: set[str] = set()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dicom(path)
            values = header_text_values(ds)
            result.images = _convert_dataset(ds, path, source, out_dir, options, detector)
    except NotAnImage:
        result.skipped = True
    except Rejected as err:
        result.error = redact(str(err), values)
    except Exception as err:  # anything unforeseen still must not stop the batch
        result.error = redact(f"conversion failed ({type(err).__name__}: {err})", values)
    return result


def _convert_dataset(
    ds: Dataset, path: Path, source: str, out_dir: Path, options: ConvertOptions, detector: TextDetector | None
) -> list[ImageRecord]:
    uid = str(ds.get("SOPInstanceUID") or "").strip() or f"path:{source}"
    stem = image_stem(options.salt, uid)
    original_patient_id = str(ds.get("PatientID") or "")
    pseudo_patient = patient_pseudonym(options.salt, original_patient_id)
    label = path.parent.name if options.label_from_parent else options.label
    count = frame_count(ds)
    indices = select_frames(options.frames, count)

    planned = []
    for index in indices:
        name = f"{stem}.png" if count == 1 else f"{stem}_f{index:04d}.png"
        target = out_dir / IMAGE_DIR / name
        if target.exists() and not options.overwrite:
            raise Rejected(f"output {IMAGE_DIR}/{name} already exists (use --overwrite to replace it)")
        planned.append((index, target))

    frames: list[FrameRecord] = []
    try:
        for index, target in planned:
            frames.append(_convert_frame(ds, index, target, options, detector))
    except Exception:
        # A cine file that fails part-way leaves no frames behind: the file is either all in, or in errors.csv.
        for frame in frames:
            (out_dir / frame.path).unlink(missing_ok=True)
        raise
    return [
        ImageRecord(
            **asdict(frame),
            label=label,
            patient_id=pseudo_patient,
            center=options.center,
            source=source,
            sop_instance_uid=uid,
            original_patient_id=original_patient_id,
        )
        for frame in frames
    ]


def _convert_frame(ds: Dataset, index: int, target: Path, options: ConvertOptions, detector: TextDetector | None) -> FrameRecord:
    """Decode, crop, mask and write one frame."""
    image = decode_frame(ds, index)
    box = ultrasound_region_box(ds, image.shape[0], image.shape[1])
    if box is not None:
        x0, y0, x1, y1 = box
        image = np.ascontiguousarray(image[y0:y1, x0:x1])
    boxes = confirmed_text_boxes(image, detector, options.rules) if detector is not None else []
    masked_pixels = black_out(image, boxes)
    _write_png(image, target, options.png_compression)
    return FrameRecord(
        path=f"{IMAGE_DIR}/{target.name}",
        frame=index,
        height=image.shape[0],
        width=image.shape[1],
        bit_depth=image.dtype.itemsize * 8,
        cropped=box is not None,
        masked_regions=len(boxes),
        masked_fraction=masked_pixels / (image.shape[0] * image.shape[1]),
    )


def _write_png(image: np.ndarray, target: Path, compression: int) -> None:
    """Write via a temporary file and rename, so a failure never leaves a partial PNG."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise Rejected("PNG encoding failed")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(encoded.tobytes())
    os.replace(tmp, target)


def _worker_convert(path: str, source: str, out_dir: str, options: ConvertOptions) -> FileResult:
    return convert_file(Path(path), source, Path(out_dir), options, _detector if options.detect_text else None)


def find_inputs(in_dir: Path, out_dir: Path) -> list[Path]:
    """Every regular file under ``in_dir`` (any extension), sorted, skipping hidden files and ``out_dir``."""
    out_resolved = out_dir.resolve()
    found = []
    for root, dirs, files in os.walk(in_dir):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (root_path / d).resolve() != out_resolved)
        found.extend(root_path / name for name in sorted(files) if not name.startswith("."))
    return found


def convert_tree(
    in_dir: Path,
    out_dir: Path,
    options: ConvertOptions,
    *,
    workers: int = 2,
    key_file: Path | None = None,
    progress: bool = True,
) -> Summary:
    """Convert every DICOM under ``in_dir`` into ``out_dir``; see the module docstring for the outputs.

    Raises HSQformerError (before converting anything) for unusable folders or an
    existing manifest without ``overwrite``; bad input files only land in errors.csv.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    _check_paths(in_dir, out_dir, options, key_file)
    inputs = find_inputs(in_dir, out_dir)
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)

    results = list(_run(inputs, in_dir, out_dir, options, workers, progress))
    results.sort(key=lambda r: r.source)
    images = [image for r in results for image in r.images]
    _write_csv(out_dir / "manifest.csv", MANIFEST_COLUMNS, [asdict(i) for i in images])
    _write_csv(
        out_dir / "report.csv",
        REPORT_COLUMNS,
        [{**asdict(i), "cropped": int(i.cropped), "masked_fraction": f"{i.masked_fraction:.6f}"} for i in images],
    )
    _write_csv(out_dir / "errors.csv", ERROR_COLUMNS, [{"path": r.source, "reason": r.error} for r in results if r.error])
    if key_file is not None:
        _write_key_file(key_file, options.salt, images)
    return Summary(
        files=len(results),
        converted=sum(1 for r in results if r.images),
        images=len(images),
        masked_regions=sum(i.masked_regions for i in images),
        failed=sum(1 for r in results if r.error),
        skipped=sum(1 for r in results if r.skipped),
    )


def _check_paths(in_dir: Path, out_dir: Path, options: ConvertOptions, key_file: Path | None) -> None:
    if not in_dir.is_dir():
        raise HSQformerError(f"input folder {in_dir} does not exist or is not a folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise HSQformerError(f"output {out_dir} exists and is not a folder")
    if in_dir.resolve() == out_dir.resolve():
        raise HSQformerError("OUT_DIR must differ from IN_DIR (originals are never modified)")
    for name in ("manifest.csv", "report.csv", "errors.csv"):
        if (out_dir / name).exists() and not options.overwrite:
            raise HSQformerError(f"{out_dir / name} already exists; use --overwrite to replace it")
    if key_file is not None:
        if out_dir.resolve() in key_file.resolve().parents:
            raise HSQformerError(f"key file {key_file} must be outside OUT_DIR: it links outputs back to patients")
        if key_file.exists() and not options.overwrite:
            raise HSQformerError(f"key file {key_file} already exists; use --overwrite to replace it")
    if options.frames not in ("all", "first", "middle", "last"):
        try:
            parse_frame_list(options.frames)
        except ValueError as err:
            raise HSQformerError(f"--frames: {err}") from err


def _run(
    inputs: list[Path], in_dir: Path, out_dir: Path, options: ConvertOptions, workers: int, progress: bool
) -> Iterator[FileResult]:
    def bar() -> tqdm:
        return tqdm(total=len(inputs), unit="file", desc="dicom2png", disable=not progress)

    if workers <= 1:
        _init_worker(options.detect_text)
        with bar() as pbar:
            for path in inputs:
                yield _worker_convert(str(path), path.relative_to(in_dir).as_posix(), str(out_dir), options)
                pbar.update()
        return
    # Spawn, not fork: the parent may hold OpenCV or torch thread locks that would deadlock a forked child.
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(options.detect_text,)
    ) as pool:
        futures = [
            pool.submit(_worker_convert, str(p), p.relative_to(in_dir).as_posix(), str(out_dir), options) for p in inputs
        ]
        with bar() as pbar:
            for future in as_completed(futures):
                yield future.result()
                pbar.update()


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _write_key_file(path: Path, salt: str, images: list[ImageRecord]) -> None:
    entries = [
        {
            "path": i.path,
            "source": i.source,
            "frame": i.frame,
            "sop_instance_uid": i.sop_instance_uid,
            "patient_id": i.original_patient_id,
            "patient_pseudonym": i.patient_id,
        }
        for i in images
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"salt": salt, "images": entries}, indent=1), encoding="utf-8")
    os.replace(tmp, path)
