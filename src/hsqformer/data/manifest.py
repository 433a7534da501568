"""Read a dataset into one table of images, labels, patients and centers.

A dataset is either a folder with one sub-folder per class, a folder holding a
``manifest.csv``, or a CSV manifest with the columns ``path,label,patient_id,center``.
Everything that could stop a training run half-way (a missing or unreadable
image, an unknown label, a missing column, an empty class, an image listed
twice) is checked here, up front, and reported as one ``HSQformerError`` line
that names the file or row at fault.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from hsqformer.errors import HSQformerError

MANIFEST_COLUMNS = ("path", "label", "patient_id", "center")
MANIFEST_NAME = "manifest.csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def one_line(text: object) -> str:
    """Collapse a message (e.g. a library's exception text) onto one line."""
    return " ".join(str(text).split())


def load_dataset(
    source: str | Path,
    classes: Sequence[str] | None = None,
    *,
    verify_images: bool = True,
) -> pd.DataFrame:
    """Read a dataset folder or CSV manifest into a checked table.

    Returns a DataFrame with the string columns ``path`` (absolute), ``label``,
    ``patient_id`` and ``center`` (``""`` when missing): manifest order for a CSV,
    sorted by class and path for a folder. ``classes`` fixes the label set and
    its order; any other label is an error, and so are two labels that differ
    only by case or spaces. With ``verify_images`` every image is decoded in full
    (``check_images``), so an unreadable or truncated file fails here and not
    mid-training. ``frame.attrs["where"]`` keeps, per row, where it came from
    ("row 3 of data.csv") for later messages. Rows without a patient id raise a
    warning: their splits can only be image-level, so images of one patient may
    land on both sides of a split.
    """
    path = Path(source)
    if not path.exists():
        raise HSQformerError(f"dataset not found: {path}")
    if path.is_dir():
        manifest = path / MANIFEST_NAME
        frame, where = (_read_manifest(manifest) if manifest.is_file() else _read_folder(path, classes))
    else:
        frame, where = _read_manifest(path)
    check_label_spelling(frame["label"].tolist(), where)
    if classes is not None:
        _check_classes(frame, classes, where)
    _check_duplicates(frame, where)
    _check_nonempty(frame, classes, path)
    if verify_images:
        check_images(frame, where)
    _warn_missing_patients(frame, path)
    frame = frame[list(MANIFEST_COLUMNS)].reset_index(drop=True)
    frame.attrs["source"] = str(path)
    frame.attrs["where"] = list(where)
    return frame


def row_origins(frame: pd.DataFrame) -> list[str]:
    """Per row of ``frame`` (a table from ``load_dataset`` or a row subset of one), where it came from
    ("" when the table does not tell)."""
    where = frame.attrs.get("where")
    index = frame.index
    if where is not None and len(index) and pd.api.types.is_integer_dtype(index) and 0 <= index.min() and index.max() < len(where):
        return [where[i] for i in index]
    return [""] * len(frame)


def check_images(frame: pd.DataFrame, where: Sequence[str] | None = None, *, workers: int | None = None) -> None:
    """Decode every image in full, as training will, in parallel threads with a progress bar.

    Catches missing, non-image, truncated and oversized (decompression bomb) files. Raises
    one ``HSQformerError`` naming the first bad row and how many more there are.
    """
    where = list(where) if where is not None else row_origins(frame)
    failures = find_unreadable(frame["path"].tolist(), where, workers=workers)
    if failures:
        more = f" (and {len(failures) - 1} more missing or unreadable images)" if len(failures) > 1 else ""
        raise HSQformerError(next(iter(failures.values())) + more)


def find_unreadable(
    paths: Sequence[str | Path], where: Sequence[str] | None = None, *, workers: int | None = None
) -> dict[int, str]:
    """``{position: one-line reason}`` of every file in ``paths`` that cannot be decoded in full, in order.

    Pillow decodes without holding the GIL, so ``workers`` threads (default: the CPU count, 2 to 8)
    decode in parallel; a tqdm bar shows the progress on a terminal.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from hsqformer.data.images import load_image

    where = list(where) if where is not None else [""] * len(paths)
    workers = workers or min(8, max(2, os.cpu_count() or 1))

    def check(i: int) -> str | None:
        try:
            load_image(paths[i], where[i])
        except HSQformerError as err:
            return str(err)
        return None

    failures: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(paths), desc="check images", unit="img", leave=False, disable=None
    ) as bar:
        for i, message in enumerate(pool.map(check, range(len(paths)))):
            bar.update()
            if message is not None:
                failures[i] = message
    return failures


def check_label_spelling(labels: Sequence[str], where: Sequence[str]) -> None:
    """Refuse labels that differ only by case or spaces ('malignant' and 'Malignant '): they would be
    separate classes and could silently change which class is positive."""
    first: dict[str, tuple[str, str]] = {}
    for label, origin in zip(labels, where):
        key = " ".join(label.split()).casefold()
        seen = first.setdefault(key, (label, origin))
        if seen[0] != label:
            raise HSQformerError(
                f"labels {seen[0]!r} ({seen[1]}) and {label!r} ({origin}) differ only by case or spaces; "
                "spell each class the same way everywhere"
            )


def class_names(frame: pd.DataFrame, classes: Sequence[str] | None = None) -> list[str]:
    """The class order: ``classes`` if given, else the sorted unique labels."""
    if classes is not None:
        return list(classes)
    return sorted(frame["label"].unique().tolist())


def _read_manifest(csv_path: Path) -> tuple[pd.DataFrame, list[str]]:
    """Parse a CSV manifest; paths become absolute, relative ones to the CSV's folder.

    Also returns, per row, where it came from ("row 3 of data.csv") for messages.
    """
    try:
        with warnings.catch_warnings():
            # A row with more fields than the header would otherwise be silently cut.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                csv_path, dtype=str, keep_default_na=False, skipinitialspace=True,
                encoding="utf-8-sig", index_col=False,
            )
    except pd.errors.EmptyDataError:
        raise HSQformerError(f"manifest {csv_path} is empty (expected columns {','.join(MANIFEST_COLUMNS)})") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError, OSError, ValueError) as err:
        raise HSQformerError(f"cannot read manifest {csv_path}: {one_line(err)}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    for column in MANIFEST_COLUMNS:
        if column not in frame.columns:
            raise HSQformerError(
                f"manifest {csv_path} has no column '{column}' "
                f"(expected columns {','.join(MANIFEST_COLUMNS)}; found {','.join(frame.columns)})"
            )
    frame = frame[list(MANIFEST_COLUMNS)].apply(lambda col: col.str.strip())
    where = [f"row {i + 1} of {csv_path}" for i in range(len(frame))]
    for column in ("path", "label"):
        empty = frame.index[frame[column] == ""]
        if len(empty):
            raise HSQformerError(f"empty '{column}' in {where[empty[0]]}")
    base = csv_path.absolute().parent
    frame["path"] = [os.path.normpath(base / p) for p in frame["path"]]
    return frame, where


def _read_folder(folder: Path, classes: Sequence[str] | None) -> tuple[pd.DataFrame, list[str]]:
    """List a folder-per-class dataset: each visible sub-folder is a class."""
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise HSQformerError(
            f"dataset folder {folder} has neither a {MANIFEST_NAME} nor class sub-folders"
        )
    rows = []
    for class_dir in class_dirs:
        if classes is not None and class_dir.name not in classes:
            raise HSQformerError(
                f"unknown label '{class_dir.name}' (folder {class_dir}); expected one of {', '.join(classes)}"
            )
        images = sorted(
            p for p in class_dir.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
        )
        if not images:
            raise HSQformerError(f"empty class '{class_dir.name}': folder {class_dir} has no images")
        rows += [(os.path.normpath(p.absolute()), class_dir.name, "", "") for p in images]
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    return frame, [f"file {p}" for p in frame["path"]]


def _check_classes(frame: pd.DataFrame, classes: Sequence[str], where: list[str]) -> None:
    """Every label must be one of ``classes``, which must themselves be distinct."""
    if len(set(classes)) != len(classes):
        raise HSQformerError(f"classes are not distinct: {', '.join(classes)}")
    unknown = ~frame["label"].isin(list(classes))
    if unknown.any():
        i = int(unknown.to_numpy().nonzero()[0][0])
        raise HSQformerError(
            f"unknown label '{frame['label'].iloc[i]}' in {where[i]}; expected one of {', '.join(classes)}"
        )


def _check_duplicates(frame: pd.DataFrame, where: list[str]) -> None:
    """The same image file may be listed only once (it would count twice and could leak)."""
    real = pd.Series([os.path.realpath(p) for p in frame["path"]])
    repeated = real.duplicated(keep=False)
    if repeated.any():
        first, second = repeated.to_numpy().nonzero()[0][:2]
        raise HSQformerError(
            f"image listed twice: {frame['path'].iloc[first]} ({where[first]} and {where[second]})"
        )


def _check_nonempty(frame: pd.DataFrame, classes: Sequence[str] | None, source: Path) -> None:
    """Every class needs images, and a classifier needs at least two classes."""
    if classes is not None:
        counts = frame["label"].value_counts()
        for name in classes:
            if counts.get(name, 0) == 0:
                raise HSQformerError(f"empty class '{name}': no images with this label in {source}")
    labels = class_names(frame, classes)
    if len(labels) < 2:
        found = labels[0] if labels else "none"
        raise HSQformerError(f"dataset {source} needs at least two classes (found: {found})")


def _warn_missing_patients(frame: pd.DataFrame, source: Path) -> None:
    missing = int((frame["patient_id"] == "").sum())
    if missing:
        warnings.warn(
            f"{missing} of {len(frame)} images in {source} have no patient_id: splits are image-level "
            "for them, so images of one patient may fall on both sides of a split",
            UserWarning,
            stacklevel=3,
        )
