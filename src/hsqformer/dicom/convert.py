"""Batch conversion of a DICOM folder into de-identified PNGs and a training manifest.

Layout of OUT_DIR:
- ``images/<pseudonym>.png`` (``<pseudonym>_f<frame>.png`` for multi-frame files);
- ``manifest.csv`` (``path,label,patient_id,center``; path relative to OUT_DIR), the
  dataset format of the training pipeline;
- ``report.csv``: per image, its size, bit depth, whether it was cropped and how many
  text regions (and what fraction of pixels) were masked;
- ``errors.csv``: ``input,reason`` for every input that failed, the input named by a
  pseudonym (input file names can carry patient names); the CLI prints each failed
  input's path on stderr, and the key file maps the pseudonyms back.
The optional key file (outside OUT_DIR, readable by its owner only) maps pseudonyms back
to inputs and holds the salt.

Two inputs with the same SOP Instance UID (duplicates, re-exports) would write the same
PNG: the inputs' UIDs are read before any conversion, and the inputs of one UID go to
one worker together, which converts the first of them (in path order) that converts
and lists the later ones in errors.csv as its duplicates. The manifest lists exactly
the PNGs that this run wrote.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import current_process as mp_current_process
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset
from tqdm import tqdm

from hsqformer.dicom.deidentify import header_text_values, image_stem, patient_pseudonym, pseudonym, redact
from hsqformer.dicom.pixels import decode_frame, frame_count, parse_frame_list, select_frames, ultrasound_region_box
from hsqformer.dicom.reader import NotAnImage, Rejected, read_dicom
from hsqformer.dicom.text_masking import TextDetector, TextRules, black_out, confirmed_text_boxes
from hsqformer.errors import HSQformerError
from hsqformer.files import atomic_path, write_rows

MANIFEST_COLUMNS = ("path", "label", "patient_id", "center")
REPORT_COLUMNS = ("path", "frame", "height", "width", "bit_depth", "cropped", "masked_regions", "masked_fraction")
ERROR_COLUMNS = ("input", "reason")
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
    """The outcome for one input file; ``source`` is its path relative to IN_DIR, ``input_id`` its pseudonym."""

    source: str
    images: list[ImageRecord] = field(default_factory=list)
    error: str = ""
    skipped: bool = False
    input_id: str = ""
    duplicate_of: str = ""  # the source of the first input with the same SOP Instance UID


@dataclass
class Summary:
    """Totals of a run, for the CLI's closing line; ``failures`` lists (source, input id, reason)."""

    files: int
    converted: int
    images: int
    masked_regions: int
    failed: int
    skipped: int
    duplicates: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)


_detector: TextDetector | None = None


def _init_worker(detect_text: bool) -> None:
    """Per-process set-up: silence pydicom's log (it quotes header values) and load the detector once."""
    global _detector
    if mp_current_process().name != "MainProcess":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every worker; the parent stops the batch
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    cv2.setNumThreads(1)
    if detect_text and _detector is None:
        from hsqformer.dicom.text_masking import RapidOCRDetector

        _detector = RapidOCRDetector(threads=1)


def convert_file(path: Path, source: str, out_dir: Path, options: ConvertOptions, detector: TextDetector | None) -> FileResult:
    """Convert one input file; never raises for bad input (the reason goes to ``error``)."""
    result = FileResult(source=source)
    # File paths can carry patient names: an exception that quotes one must not carry it into errors.csv.
    values: set[str] = {str(path), path.as_posix(), str(path.absolute())} | ({source} if "/" in source else set())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dicom(path)
            values |= header_text_values(ds)
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
    _write_png(image, target, options.png_compression, options.overwrite)
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


def _write_png(image: np.ndarray, target: Path, compression: int, overwrite: bool = False) -> None:
    """Write atomically (a failure never leaves a partial PNG); without ``overwrite`` never over an
    existing file, with no window between a check and the write."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise Rejected("PNG encoding failed")
    try:
        with atomic_path(target, exclusive=not overwrite) as tmp:
            tmp.write_bytes(encoded.tobytes())
    except FileExistsError:
        raise Rejected(f"output {IMAGE_DIR}/{target.name} already exists (use --overwrite to replace it)") from None


def _worker_convert(group: list[tuple[str, str]], out_dir: str, options: ConvertOptions) -> list[FileResult]:
    """Convert the inputs of one SOP Instance UID (usually one): the first that converts, the others are its duplicates."""
    detector = _detector if options.detect_text else None
    results: list[FileResult] = []
    converted = ""
    for path, source in group:
        if converted:
            results.append(FileResult(source=source, duplicate_of=converted))
            continue
        result = convert_file(Path(path), source, Path(out_dir), options, detector)
        if result.images:
            converted = source
        results.append(result)
    return results


def input_id(salt: str, source: str) -> str:
    """The pseudonym of an input file (its path relative to IN_DIR) in errors.csv."""
    return "input-" + pseudonym(salt, "input", source, length=12)


def instance_key(path: Path, source: str) -> str:
    """What decides a file's output names: its SOP Instance UID (header only is read), else its path."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPInstanceUID"])
        uid = str(ds.get("SOPInstanceUID") or "").strip()
    except Exception:  # not DICOM or damaged: the conversion itself reports why
        uid = ""
    return f"uid:{uid}" if uid else f"path:{source}"


def group_by_instance(inputs: list[Path], sources: list[str]) -> list[list[tuple[Path, str]]]:
    """The inputs grouped by SOP Instance UID (in path order; a file without one is a group of its own)."""
    groups: dict[str, list[tuple[Path, str]]] = {}
    for path, source in zip(inputs, sources):
        groups.setdefault(instance_key(path, source), []).append((path, source))
    return list(groups.values())


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
    if not inputs:
        raise HSQformerError(f"no input files in {in_dir} (searched recursively; hidden files are skipped)")
    sources = [p.relative_to(in_dir).as_posix() for p in inputs]
    groups = group_by_instance(inputs, sources)
    earlier = _manifest_paths(out_dir / "manifest.csv") if options.overwrite else set()
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)

    results = [r for group in _run(groups, out_dir, options, workers, progress, len(inputs)) for r in group]
    results.sort(key=lambda r: r.source)
    _set_aside_repeated_names(results)
    ids = {s: input_id(options.salt, s) for s in sources}
    for r in results:
        r.input_id = ids[r.source]
        if r.duplicate_of:
            r.error = f"duplicate of {ids[r.duplicate_of]} (same SOP Instance UID); not converted again"
    images = [image for r in results for image in r.images]
    written = {i.path for i in images}
    for stale in earlier - written:  # --overwrite: PNGs of the replaced manifest that this run did not write
        (out_dir / stale).unlink(missing_ok=True)
    write_rows(out_dir / "manifest.csv", MANIFEST_COLUMNS, [asdict(i) for i in images])
    write_rows(
        out_dir / "report.csv",
        REPORT_COLUMNS,
        [{**asdict(i), "cropped": int(i.cropped), "masked_fraction": f"{i.masked_fraction:.6f}"} for i in images],
    )
    failed = [r for r in results if r.error]
    write_rows(out_dir / "errors.csv", ERROR_COLUMNS, [{"input": r.input_id, "reason": r.error} for r in failed])
    if key_file is not None:
        _write_key_file(key_file, options.salt, images, failed)
    return Summary(
        files=len(results),
        converted=sum(1 for r in results if r.images),
        images=len(images),
        masked_regions=sum(i.masked_regions for i in images),
        failed=len(failed),
        skipped=sum(1 for r in results if r.skipped),
        duplicates=sum(1 for r in results if r.duplicate_of),
        failures=[
            (r.source, r.input_id, r.error + (f" (first: {r.duplicate_of})" if r.duplicate_of else "")) for r in failed
        ],
    )


def _set_aside_repeated_names(results: list[FileResult]) -> None:
    """Should two files still have given one PNG name (their UIDs read differently in full), the later
    becomes a duplicate of the earlier: the manifest lists each PNG once."""
    owner: dict[str, str] = {}
    for r in results:
        first = next((owner[i.path] for i in r.images if i.path in owner), None)
        if first is not None:
            r.images, r.duplicate_of = [], first
            continue
        owner.update((i.path, r.source) for i in r.images)


def _manifest_paths(manifest: Path) -> set[str]:
    """The ``images/<name>.png`` paths listed in an earlier manifest (nothing else is ever deleted)."""
    try:
        with manifest.open(newline="", encoding="utf-8") as handle:
            paths = {row.get("path") or "" for row in csv.DictReader(handle)}
    except (OSError, csv.Error, UnicodeDecodeError):
        return set()
    return {p for p in paths if p.startswith(f"{IMAGE_DIR}/") and "/" not in p[len(IMAGE_DIR) + 1 :] and p.endswith(".png")}


def _check_paths(in_dir: Path, out_dir: Path, options: ConvertOptions, key_file: Path | None) -> None:
    if not in_dir.is_dir():
        raise HSQformerError(f"input folder {in_dir} does not exist or is not a folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise HSQformerError(f"output {out_dir} exists and is not a folder")
    if in_dir.resolve() == out_dir.resolve():
        raise HSQformerError("OUT_DIR must differ from IN_DIR (originals are never modified)")
    if in_dir.resolve() in out_dir.resolve().parents:
        raise HSQformerError(f"OUT_DIR {out_dir} is inside IN_DIR {in_dir}: a later run would read its own outputs")
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
    groups: list[list[tuple[Path, str]]],
    out_dir: Path,
    options: ConvertOptions,
    workers: int,
    progress: bool,
    n_files: int,
) -> Iterator[list[FileResult]]:
    """Convert groups of ``(path, source)`` pairs, in this process or in ``workers`` spawned processes."""

    def bar() -> tqdm:
        return tqdm(total=n_files, unit="file", desc="dicom2png", disable=not progress)

    tasks = [[(str(p), s) for p, s in group] for group in groups]
    if workers <= 1:
        _init_worker(options.detect_text)
        with bar() as pbar:
            for task in tasks:
                yield _worker_convert(task, str(out_dir), options)
                pbar.update(len(task))
        return
    # Spawn, not fork: the parent may hold OpenCV or torch thread locks that would deadlock a forked child.
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(options.detect_text,)
    ) as pool:
        futures = [pool.submit(_worker_convert, task, str(out_dir), options) for task in tasks]
        try:
            with bar() as pbar:
                for future in as_completed(futures):
                    results = future.result()
                    yield results
                    pbar.update(len(results))
        except BaseException:  # interrupted: do not convert the files still queued
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _write_key_file(path: Path, salt: str, images: list[ImageRecord], failed: list[FileResult]) -> None:
    """The key (salt, inputs, UIDs, patient ids): created readable by its owner only (0600), atomically."""
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
    errors = [{"input": r.input_id, "source": r.source, "reason": r.error} for r in failed]
    text = json.dumps({"salt": salt, "images": entries, "failed": errors}, indent=1)
    with atomic_path(path, mode=0o600) as tmp, tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
