"""The registry of public ultrasound datasets that ``hsqformer data fetch`` can download.

The registry is a YAML file: ``registry.yaml`` inside this package, or another file named by
``--registry FILE`` or the environment variable ``HSQFORMER_DATA_REGISTRY`` (the tests use this to
point ``fetch`` at a local server; a lab can use it for its own mirror). Each entry says where the
archives are, what their checksums are *if the publisher states them* (``null`` otherwise: a checksum
is never guessed), the license and citation, and how to turn the extracted files into a dataset folder
with a ``manifest.csv`` (which folder holds which class, which files to leave out, how many images of
each class there must be). Loading checks every field and names the one at fault.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from hsqformer.errors import HSQformerError

REGISTRY_ENV = "HSQFORMER_DATA_REGISTRY"
REGISTRY_FORMAT = "hsqformer-data-registry/1"
ARCHIVE_FORMATS = ("zip", "tar", "tar.gz")
PATIENT_ID_FIELDS = ("stem", "label")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_HEX = {"sha256": re.compile(r"^[0-9a-f]{64}$"), "md5": re.compile(r"^[0-9a-f]{32}$")}


@dataclass(frozen=True)
class RemoteFile:
    """One archive of a dataset: where it is and how to check it.

    ``sha256``/``md5`` are the publisher's checksums, or ``None`` when none is published;
    ``checksum_source`` says where a stated checksum comes from, or why there is none.
    """

    url: str
    name: str
    format: str
    size_bytes: int | None
    sha256: str | None
    md5: str | None
    checksum_source: str

    @property
    def checksum(self) -> tuple[str, str] | None:
        """The strongest stated checksum as ``(algorithm, hex digest)``, or ``None``."""
        if self.sha256:
            return "sha256", self.sha256
        if self.md5:
            return "md5", self.md5
        return None


@dataclass(frozen=True)
class Layout:
    """How the extracted files become a dataset.

    ``root`` is the folder of the archive(s) that holds the set (its path prefix is dropped on
    extraction, and nothing outside it is extracted); ``classes`` maps a folder under ``root``
    (matched ignoring case) to its label, every image below that folder being of that class;
    ``exclude`` holds file-name patterns that are not images of the set (e.g. segmentation masks);
    ``patient_id`` is a template over ``{stem}`` and ``{label}`` ("" when the set has no patient ids);
    ``expected_images`` is the published number of images per label, checked after extraction.
    """

    root: str
    classes: dict[str, str]
    exclude: tuple[str, ...]
    patient_id: str
    center: str
    expected_images: dict[str, int]


@dataclass(frozen=True)
class DatasetEntry:
    """A public dataset: what it is, under which terms, where its archives are and how to lay it out."""

    name: str
    title: str
    homepage: str
    license: str
    citation: str
    notes: str
    files: tuple[RemoteFile, ...]
    layout: Layout

    @property
    def verifiable(self) -> bool:
        """Whether every archive has a published checksum (else ``fetch`` needs ``--accept-unverified``)."""
        return all(f.checksum is not None for f in self.files)

    @property
    def size_bytes(self) -> int | None:
        """The total download size, or ``None`` when any archive's size is unknown."""
        sizes = [f.size_bytes for f in self.files]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)

    @property
    def n_images(self) -> int:
        return sum(self.layout.expected_images.values())


def default_registry_path() -> Path:
    """The registry in effect: ``$HSQFORMER_DATA_REGISTRY`` if set, else the one shipped in the package."""
    override = os.environ.get(REGISTRY_ENV)
    return Path(override) if override else Path(__file__).with_name("registry.yaml")


def load_registry(path: str | Path | None = None) -> dict[str, DatasetEntry]:
    """Read and check a registry file (default: ``default_registry_path()``); entries by name, in file order."""
    import yaml

    path = Path(path) if path is not None else default_registry_path()
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HSQformerError(f"dataset registry not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        from hsqformer.data.manifest import one_line

        raise HSQformerError(f"cannot read dataset registry {path}: {one_line(err)}") from None
    if not isinstance(document, dict) or document.get("format") != REGISTRY_FORMAT:
        raise HSQformerError(f"dataset registry {path}: expected a mapping with format: {REGISTRY_FORMAT}")
    datasets = document.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise HSQformerError(f"dataset registry {path}: 'datasets' must be a non-empty mapping of name to entry")
    return {str(name): _entry(str(name), raw, _Where(path, f"dataset '{name}'")) for name, raw in datasets.items()}


def get_entry(registry: dict[str, DatasetEntry], name: str) -> DatasetEntry:
    """The entry called ``name``; an unknown name is an error that lists the known ones."""
    if name not in registry:
        raise HSQformerError(f"unknown dataset '{name}'; known datasets: {', '.join(registry)}")
    return registry[name]


@dataclass(frozen=True)
class _Where:
    """The registry file and the entry being read, for error messages."""

    path: Path
    context: str

    def error(self, field: str, problem: str) -> HSQformerError:
        return HSQformerError(f"dataset registry {self.path}: {self.context}: '{field}' {problem}")

    def inner(self, context: str) -> _Where:
        return _Where(self.path, f"{self.context}, {context}")


def _entry(name: str, raw: Any, where: _Where) -> DatasetEntry:
    if not _NAME.match(name):
        raise where.error("name", "must be lower-case letters, digits, '.', '_' or '-' (it names a folder)")
    if not isinstance(raw, dict):
        raise where.error("entry", "must be a mapping")
    files = raw.get("files")
    if not isinstance(files, list) or not files:
        raise where.error("files", "must be a non-empty list of archives")
    remote = tuple(_remote_file(item, where.inner(f"file {i + 1}")) for i, item in enumerate(files))
    names = [f.name for f in remote]
    if len(set(names)) != len(names):
        raise where.error("files", f"has two archives with the same name ({', '.join(names)})")
    return DatasetEntry(
        name=name,
        title=_text(raw, "title", where),
        homepage=_text(raw, "homepage", where),
        license=_text(raw, "license", where),
        citation=_text(raw, "citation", where),
        notes=_text(raw, "notes", where, required=False),
        files=remote,
        layout=_layout(raw.get("layout"), where.inner("layout")),
    )


def _remote_file(raw: Any, where: _Where) -> RemoteFile:
    if not isinstance(raw, dict):
        raise where.error("file", "must be a mapping")
    url = _text(raw, "url", where)
    if not url.startswith(("https://", "http://")):
        raise where.error("url", f"must be an http(s) address, not {url!r}")
    name = _text(raw, "name", where)
    if PurePosixPath(name).name != name or name in (".", ".."):
        raise where.error("name", f"must be a plain file name, not {name!r}")
    archive_format = _text(raw, "format", where)
    if archive_format not in ARCHIVE_FORMATS:
        raise where.error("format", f"must be one of {', '.join(ARCHIVE_FORMATS)}, not {archive_format!r}")
    size = raw.get("size_bytes")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise where.error("size_bytes", f"must be a positive number of bytes or null, not {size!r}")
    digests = {}
    for algorithm, pattern in _HEX.items():
        value = raw.get(algorithm)
        if value is not None and not (isinstance(value, str) and pattern.match(value.lower())):
            digits = 64 if algorithm == "sha256" else 32
            raise where.error(algorithm, f"must be a hex digest of {digits} digits, or null when none is published")
        digests[algorithm] = value.lower() if isinstance(value, str) else None
    return RemoteFile(url, name, archive_format, size, digests["sha256"], digests["md5"],
                      _text(raw, "checksum_source", where))


def _layout(raw: Any, where: _Where) -> Layout:
    if not isinstance(raw, dict):
        raise where.error("layout", "must be a mapping")
    root = raw.get("root", "")
    if not isinstance(root, str) or ".." in PurePosixPath(root).parts or root.startswith("/"):
        raise where.error("root", f"must be a relative folder inside the archive, not {root!r}")
    classes = raw.get("classes")
    if not isinstance(classes, dict) or not classes or not all(
        isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip() for k, v in classes.items()
    ):
        raise where.error("classes", "must map each class folder to a non-empty label")
    exclude = raw.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(p, str) and p for p in exclude):
        raise where.error("exclude", "must be a list of file-name patterns")
    patient_id = raw.get("patient_id", "")
    if not isinstance(patient_id, str):
        raise where.error("patient_id", "must be a template such as '{stem}', or ''")
    try:
        patient_id.format(**{field: "x" for field in PATIENT_ID_FIELDS})
    except (KeyError, IndexError, ValueError):
        raise where.error("patient_id", f"may only use the fields {', '.join('{' + f + '}' for f in PATIENT_ID_FIELDS)}") from None
    expected = raw.get("expected_images")
    labels = set(classes.values())
    if not isinstance(expected, dict) or set(expected) != labels or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in expected.values()
    ):
        raise where.error("expected_images", f"must give a positive image count for each label ({', '.join(sorted(labels))})")
    return Layout(
        root=str(PurePosixPath(root)) if root.strip() else "",
        classes={str(PurePosixPath(k)): v for k, v in classes.items()},
        exclude=tuple(exclude),
        patient_id=patient_id,
        center=_text(raw, "center", where, required=False),
        expected_images=dict(expected),
    )


def _text(raw: dict[str, Any], field: str, where: _Where, *, required: bool = True) -> str:
    value = raw.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise where.error(field, "must be a non-empty text" if required else "must be a text")
    return " ".join(value.split())
