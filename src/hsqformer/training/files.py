"""Atomic file writes: a result file is either complete or absent, never half-written.

Each writer puts the content in a temporary file in the target's folder and
moves it over the target with ``os.replace``, which is atomic on one file system.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from hsqformer.errors import HSQformerError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _write_with(path: str | Path, write: Callable[[Path], None]) -> Path:
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return _write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically; NaN becomes ``null`` so that any JSON reader accepts it."""
    return write_text(path, json.dumps(_nan_to_none(data), indent=2, sort_keys=False) + "\n")


def write_yaml(path: str | Path, data: Any) -> Path:
    """Write ``data`` as YAML (keys in insertion order) atomically."""
    return write_text(path, yaml.safe_dump(data, sort_keys=False))


def write_csv(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write a DataFrame as CSV without its index atomically."""
    return _write_with(path, lambda tmp: frame.to_csv(tmp, index=False))


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


def prepare_report_dir(out: Path, overwrite: bool, report_format: str, what: str) -> None:
    """Make ``out`` ready for a report: refuse an existing, non-empty folder unless ``overwrite``, and even
    then unless its ``report.json`` has ``report_format`` (an earlier report of the same kind, ``what``)."""
    import shutil

    if out.exists() and not out.is_dir():
        raise HSQformerError(f"--out {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise HSQformerError(f"{out} already exists; pass --overwrite to replace it")
    try:
        earlier = json.loads((out / "report.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if earlier != report_format:
        raise HSQformerError(
            f"--overwrite: {out} does not hold a {what} (no {report_format} report.json); not deleting it"
        )
    shutil.rmtree(out)
