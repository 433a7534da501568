"""Atomic file writes: a result file is either complete or absent, never half-written.

Every file this package writes goes through ``atomic_path``: the content goes to a temporary file
in the target's folder, which is then moved over the target with ``os.replace`` (atomic on one file
system) or, where an existing file must never be replaced, hard-linked into place (which fails
atomically if the name exists, with no window between a check and the write).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsqformer.errors import HSQformerError

if TYPE_CHECKING:
    import pandas as pd


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_DEFAULT_MODE = 0o666 & ~_umask()  # what open() gives a new file; read once, umask() has no getter


@contextmanager
def atomic_path(path: str | Path, *, mode: int | None = None, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``, on failure delete it.

    ``mode``: the file's permissions (default: as ``open`` under the umask); the temporary file is
    private (0600) while it is written, so e.g. a key file at 0600 is never readable by others.
    ``exclusive``: never replace an existing ``path``; it raises ``FileExistsError`` instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _DEFAULT_MODE if mode is None else mode)
        if exclusive:
            _link_into_place(tmp_path, path)
        else:
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _link_into_place(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: the check before the move has to do
        if path.exists():
            raise FileExistsError(f"{path} already exists") from None
        os.replace(tmp, path)


def _write_with(path: str | Path, write: Callable[[Path], None], **options: Any) -> Path:
    """Write through ``atomic_path``; a failing disk or folder becomes one line naming the file."""
    try:
        with atomic_path(path, **options) as tmp:
            write(tmp)
    except OSError as err:
        if isinstance(err, FileExistsError) and options.get("exclusive") and Path(path).exists():
            raise  # the caller says what an existing file means
        raise HSQformerError(f"cannot write {path}: {err.strerror or err}") from None
    return Path(path)


def write_text(path: str | Path, text: str, **options: Any) -> Path:
    """Write ``text`` (UTF-8) atomically (``options``: those of ``atomic_path``)."""
    return _write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), **options)


def write_bytes(path: str | Path, data: bytes, **options: Any) -> Path:
    """Write ``data`` atomically (``options``: those of ``atomic_path``)."""
    return _write_with(path, lambda tmp: tmp.write_bytes(data), **options)


def write_json(path: str | Path, data: Any, **options: Any) -> Path:
    """Write ``data`` as indented JSON atomically; NaN becomes ``null`` so that any JSON reader accepts it."""
    return write_text(path, json.dumps(_nan_to_none(data), indent=2, sort_keys=False) + "\n", **options)


def write_yaml(path: str | Path, data: Any) -> Path:
    """Write ``data`` as YAML (keys in insertion order) atomically."""
    import yaml

    return write_text(path, yaml.safe_dump(data, sort_keys=False))


def write_csv(path: str | Path, frame: pd.DataFrame, **options: Any) -> Path:
    """Write a DataFrame as CSV without its index atomically."""
    return _write_with(path, lambda tmp: frame.to_csv(tmp, index=False), **options)


def write_rows(path: str | Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write dict rows as CSV (``columns`` in order, other keys ignored) atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    return _write_with(path, write)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    return value


def read_format_json(path: Path, expected_format: str, missing: str) -> dict[str, Any]:
    """Read a JSON record that this package wrote and check its ``format`` tag.

    ``missing`` is the one-line error for a file that does not exist.
    """
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HSQformerError(missing) from None
    except (OSError, json.JSONDecodeError) as err:
        raise HSQformerError(f"cannot read {path}: {err}") from None
    if not isinstance(record, dict) or record.get("format") != expected_format:
        raise HSQformerError(f"{path}: not an {expected_format} file")
    return record


def check_replaceable(out: Path, overwrite: bool, marker: str, expected_format: str, what: str) -> bool:
    """Whether ``out`` holds an earlier output to replace (True) or nothing (False); one-line errors for an
    ``out`` that is a file, or a non-empty folder without ``overwrite`` or whose ``marker`` JSON does not have
    ``expected_format`` (``what`` names that output, e.g. "a compare report"), which is never replaced."""
    if out.exists() and not out.is_dir():
        raise HSQformerError(f"--out {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return False
    if not overwrite:
        raise HSQformerError(f"{out} already exists; pass --overwrite to replace it")
    try:
        earlier = json.loads((out / marker).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if earlier != expected_format:
        raise HSQformerError(f"--overwrite: {out} does not hold {what} (no {expected_format} {marker}); not deleting it")
    return True


def prepare_report_dir(out: Path, overwrite: bool, report_format: str, what: str) -> None:
    """Make ``out`` ready for a report: empty, or an earlier report of the same kind (its ``report.json`` has
    ``report_format``) deleted when ``overwrite``; see ``check_replaceable``."""
    import shutil

    if check_replaceable(out, overwrite, "report.json", report_format, what):
        shutil.rmtree(out)
