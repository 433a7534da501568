"""Download, verify, extract and lay out a public dataset (``hsqformer data fetch``).

The steps, each of which stops with one ``HSQformerError`` line and leaves no half-made dataset:

1. The target folder ``TO/NAME`` must not exist (or ``--overwrite`` and it holds a ``fetch.json``,
   i.e. an earlier fetch made it): checked before anything is downloaded.
2. Each archive is downloaded to ``TO/.downloads/NAME/FILE.part`` with a progress bar. A broken
   connection keeps the ``.part`` file; the next run asks the server for the rest (HTTP ``Range``)
   and appends it. A finished download is renamed to ``FILE``.
3. Its SHA-256 is computed, and checked against the registry's checksum when the publisher states
   one. A mismatch renames the download to ``FILE.rejected`` (kept for inspection, never resumed) and
   touches nothing else.
4. The archives are extracted into a hidden staging folder beside the target, refusing the whole
   archive if any member could land outside it (absolute paths, ``..``, links, devices).
5. ``manifest.csv`` is built from the registry's layout rules, the image counts per class must equal
   the published ones, and every image must decode (``load_dataset``).
6. A dataset without a published checksum stops here unless ``accept_unverified``: the message gives
   the SHA-256 computed, so it can be compared with a trusted copy; the download is kept for the rerun.
7. ``fetch.json`` records the source, license, citation and the SHA-256 of every archive, and the
   staging folder is renamed to ``TO/NAME`` in one step; the downloads are then deleted.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from hsqformer.data.registry import DatasetEntry, Layout, RemoteFile
from hsqformer.errors import HSQformerError

DOWNLOADS = ".downloads"
PROVENANCE_NAME = "fetch.json"
PROVENANCE_FORMAT = "hsqformer-data-fetch/1"
_CHUNK = 1 << 16
_JUNK_NAMES = (".DS_Store", "Thumbs.db", "desktop.ini")


@dataclass
class FetchResult:
    """What ``fetch_dataset`` made: the dataset folder, its images per label, and how it was checked."""

    folder: Path
    counts: dict[str, int]
    verified: bool
    sha256: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def fetch_dataset(
    entry: DatasetEntry,
    to: str | Path,
    *,
    overwrite: bool = False,
    accept_unverified: bool = False,
    timeout: float = 60.0,
    progress: bool | None = None,
) -> FetchResult:
    """Fetch ``entry`` into ``to/<entry.name>`` (see the module docstring for the steps and guarantees).

    ``progress=None`` shows download bars only on a terminal; ``timeout`` is the seconds a connection
    may stay silent before the download counts as interrupted (and can be resumed).
    """
    to = Path(to)
    target = to / entry.name
    if to.exists() and not to.is_dir():
        raise HSQformerError(f"--to {to} is not a folder")
    _check_target(target, overwrite)
    cache = to / DOWNLOADS / entry.name
    archives = []
    for remote in entry.files:
        path = download(remote, cache, timeout=timeout, progress=progress)
        archives.append((remote, path, check_archive(path, remote)))
    digests = {remote.name: digest for remote, _, digest in archives}

    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=to))  # beside the target: one rename
    try:
        for remote, path, _ in archives:
            extract(path, remote.format, staging, entry.layout.root)
        counts = _lay_out(entry, staging, target)
        messages = _check_readable(staging, target, entry.name)
        if not entry.verifiable and not accept_unverified:
            computed = ", ".join(f"{name} {digest}" for name, digest in digests.items())
            raise HSQformerError(
                f"{entry.name}: no published checksum, so the download cannot be verified (sha256 computed here: "
                f"{computed}); the layout checks passed ({_counts_text(counts)}); the download is kept in {cache}: "
                f"compare the sha256 with a trusted copy, then rerun with --accept-unverified to use it"
            )
        _write_provenance(staging, entry, archives, counts)
        _publish(staging, target, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for _, path, _ in archives:
        path.unlink(missing_ok=True)
    _remove_empty(cache, to / DOWNLOADS)
    return FetchResult(target, counts, entry.verifiable, digests, messages)


def download(remote: RemoteFile, folder: Path, *, timeout: float = 60.0, progress: bool | None = None) -> Path:
    """Download ``remote`` to ``folder/remote.name``, resuming a ``.part`` file left by an interrupted run.

    A file already complete in ``folder`` is returned as it is (its checksum is checked by the caller).
    """
    from tqdm.auto import tqdm

    final = folder / remote.name
    if final.is_file():
        return final
    part = final.with_name(final.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    response = _open(remote, start, timeout, part)
    _make_folder(folder)  # only once the server answered: no empty folders after a failure
    if response is None:  # the server says the .part already holds the whole file
        os.replace(part, final)
        return final
    with response:
        if start and response.status != 206:
            start = 0  # the server ignored the Range request and sends the whole file again
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        if remote.size_bytes is not None and total is not None and total != remote.size_bytes:
            raise HSQformerError(
                f"{remote.url} is {total} bytes but the registry says {remote.size_bytes}; not downloading it"
                + (f" (delete {part} if it is left from another version of the file)" if start else "")
            )
        received = start
        try:
            with open(part, "ab" if start else "wb") as out, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                desc=remote.name, leave=False, disable=None if progress is None else not progress,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (http.client.HTTPException, OSError) as err:
            raise _interrupted(remote, part, received, total, err) from None
    if total is not None and received < total:
        raise _interrupted(remote, part, received, total, "the connection closed early")
    os.replace(part, final)
    return final


def check_archive(path: Path, remote: RemoteFile) -> str:
    """The SHA-256 of a downloaded archive, after checking it against every checksum the registry states.

    On a mismatch the file is renamed to ``*.rejected`` (so that no later run resumes or reuses it)
    and the error says which checksum was expected and which was found.
    """
    digests = {"sha256": hashlib.sha256(), "md5": hashlib.md5(usedforsecurity=False)}
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            for digest in digests.values():
                digest.update(chunk)
    found = {algorithm: digest.hexdigest() for algorithm, digest in digests.items()}
    for algorithm, expected in (("sha256", remote.sha256), ("md5", remote.md5)):
        if expected is not None and found[algorithm] != expected:
            rejected = path.with_name(path.name + ".rejected")
            os.replace(path, rejected)
            raise HSQformerError(
                f"{algorithm} mismatch for {remote.name} from {remote.url}: expected {expected}, got {found[algorithm]}; "
                f"the download is kept as {rejected} and nothing was extracted"
            )
    return found["sha256"]


def extract(archive: Path, archive_format: str, into: Path, root: str = "") -> int:
    """Extract the files under ``root`` of a zip or tar archive into ``into``, without the ``root`` prefix.

    Every member is checked before anything is written: one whose name is absolute, contains ``..``
    or a drive letter, or that is a link or a device, makes the whole archive an error. macOS and
    Windows folder clutter (``__MACOSX/``, ``._*``, ``.DS_Store``) is skipped, and a file is never
    written over another (two archives of one set holding the same path is an error). Returns the
    number of files written.
    """
    try:
        if archive_format == "zip":
            with zipfile.ZipFile(archive) as zip_file:
                return _extract_zip(zip_file, archive, into, root)
        with tarfile.open(archive, "r:*") as tar_file:
            return _extract_tar(tar_file, archive, into, root)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        from hsqformer.data.manifest import one_line

        raise HSQformerError(f"{archive} is not a readable {archive_format} archive: {one_line(err)}") from None


def build_manifest(folder: Path, layout: Layout) -> list[dict[str, str]]:
    """The manifest rows of the images found in ``folder`` by the layout's class folders and patterns.

    Paths are relative to ``folder`` (POSIX separators), in sorted order per class.
    """
    from hsqformer.data.manifest import IMAGE_SUFFIXES

    folders = {p: p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_dir()}
    rows = []
    for class_folder, label in layout.classes.items():
        matches = [p for p, relative in folders.items() if relative.casefold() == class_folder.casefold()]
        if not matches:
            listing = ", ".join(relative for p, relative in folders.items() if p.parent == folder)
            where = f" under '{layout.root}'" if layout.root else ""
            raise HSQformerError(
                f"no class folder '{class_folder}' (label '{label}') in the extracted files{where}; found: {listing or 'no folders'}"
            )
        if len(matches) > 1:
            names = ", ".join(folders[p] for p in matches)
            raise HSQformerError(f"class folder '{class_folder}' is ambiguous: the extracted files hold {names}")
        for image in sorted(matches[0].rglob("*")):
            if (
                image.is_file()
                and image.suffix.lower() in IMAGE_SUFFIXES
                and not image.name.startswith(".")
                and not any(fnmatch(image.name, pattern) for pattern in layout.exclude)
            ):
                rows.append({
                    "path": image.relative_to(folder).as_posix(),
                    "label": label,
                    "patient_id": layout.patient_id.format(stem=image.stem, label=label),
                    "center": layout.center,
                })
    return rows


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target that exists, before any download, unless ``overwrite`` and it came from an earlier fetch."""
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise HSQformerError(f"{target} exists and is not a plain folder; not fetching into it")
    if not any(target.iterdir()):
        return
    if not overwrite:
        raise HSQformerError(f"{target} already exists; pass --overwrite to replace it (nothing was downloaded)")
    try:
        earlier = json.loads((target / PROVENANCE_NAME).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if earlier != PROVENANCE_FORMAT:
        raise HSQformerError(
            f"--overwrite: {target} has no {PROVENANCE_NAME} of 'hsqformer data fetch', so it was not made by it; not replacing it"
        )


def _open(remote: RemoteFile, start: int, timeout: float, part: Path) -> http.client.HTTPResponse | None:
    """Send the GET (with ``Range`` when resuming); ``None`` when the ``.part`` file is already complete."""
    from importlib.metadata import version

    request = urllib.request.Request(remote.url, headers={"User-Agent": f"hsqformer/{version('hsqformer')}"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (the registry allows http(s) only)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # nothing left after `start`: complete if the server's size says so
            complete = re.fullmatch(r"bytes \*/(\d+)", err.headers.get("Content-Range", "") or "")
            if complete and int(complete.group(1)) == start:
                return None
            raise HSQformerError(
                f"{remote.url} cannot resume {part} ({start} bytes): the server refuses the range; delete the .part file and retry"
            ) from None
        raise HSQformerError(f"cannot download {remote.url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise HSQformerError(f"cannot reach {remote.url}: {reason}") from None
    if start and response.status == 206:
        resumed = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", "") or "")
        if not resumed or int(resumed.group(1)) != start:
            response.close()
            raise HSQformerError(
                f"{remote.url} answered the resume of {part} with the wrong range "
                f"({response.headers.get('Content-Range')!r} for bytes {start}-); delete the .part file and retry"
            )
    return response


def _interrupted(remote: RemoteFile, part: Path, received: int, total: int | None, reason: object) -> HSQformerError:
    of_total = f" of {total}" if total is not None else ""
    why = str(reason) or type(reason).__name__
    return HSQformerError(
        f"download of {remote.url} interrupted after {received}{of_total} bytes ({why}); "
        f"{part} is kept: run the same command again to resume"
    )


def _check_member(name: str, archive: Path) -> PurePosixPath:
    """The member's path, refusing one that could be written outside the extraction folder."""
    unix = name.replace("\\", "/")
    path = PurePosixPath(unix)
    if unix.startswith("/") or ".." in path.parts or re.match(r"^[A-Za-z]:", unix) or "\x00" in name:
        raise HSQformerError(
            f"archive {archive} has an unsafe member {name!r} (it would be written outside the dataset folder); nothing was extracted"
        )
    return path


def _relative(path: PurePosixPath, root: str) -> PurePosixPath | None:
    """The path below ``root`` that a member is written to, or ``None`` for members outside it and clutter."""
    parts = path.parts
    if not parts or "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] in _JUNK_NAMES:
        return None
    prefix = PurePosixPath(root).parts if root else ()
    if parts[: len(prefix)] != prefix or len(parts) == len(prefix):
        return None
    return PurePosixPath(*parts[len(prefix):])


def _write_member(source: BinaryIO, into: Path, relative: PurePosixPath, archive: Path) -> None:
    target = into.joinpath(*relative.parts)
    if not target.resolve().is_relative_to(into.resolve()):  # defence in depth after _check_member
        raise HSQformerError(f"archive {archive} member {relative} resolves outside the dataset folder; nothing more was extracted")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(target, "xb") as out:
            shutil.copyfileobj(source, out, _CHUNK)
    except FileExistsError:
        raise HSQformerError(f"archive {archive} member {relative} would replace a file already extracted") from None


def _extract_zip(zip_file: zipfile.ZipFile, archive: Path, into: Path, root: str) -> int:
    members = []
    for info in zip_file.infolist():
        path = _check_member(info.filename, archive)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise HSQformerError(f"archive {archive} member {info.filename!r} is a symbolic link; nothing was extracted")
        relative = _relative(path, root)
        if relative is not None and not info.is_dir():
            members.append((info, relative))
    _require_files(members, archive, root, [i.filename for i in zip_file.infolist()])
    for info, relative in members:
        with zip_file.open(info) as source:
            _write_member(source, into, relative, archive)
    return len(members)


def _extract_tar(tar_file: tarfile.TarFile, archive: Path, into: Path, root: str) -> int:
    members = []
    all_members = tar_file.getmembers()
    for member in all_members:
        path = _check_member(member.name, archive)
        if not (member.isfile() or member.isdir()):
            raise HSQformerError(
                f"archive {archive} member {member.name!r} is a link or special file; nothing was extracted"
            )
        relative = _relative(path, root)
        if relative is not None and member.isfile():
            members.append((member, relative))
    _require_files(members, archive, root, [m.name for m in all_members])
    for member, relative in members:
        source = tar_file.extractfile(member)
        if source is None:  # pragma: no cover - isfile() members always have data
            continue
        with source:
            _write_member(source, into, relative, archive)
    return len(members)


def _require_files(members: list, archive: Path, root: str, names: list[str]) -> None:
    if members:
        return
    tops = sorted({PurePosixPath(n.replace("\\", "/")).parts[0] for n in names if n.strip("/")})
    where = f" under '{root}'" if root else ""
    raise HSQformerError(
        f"archive {archive} has no files{where}; its top-level entries: {', '.join(tops[:10]) or 'none'}"
    )


def _lay_out(entry: DatasetEntry, staging: Path, target: Path) -> dict[str, int]:
    """Write ``manifest.csv`` into the staging folder and check the image counts against the registry."""
    import pandas as pd

    from hsqformer.data.manifest import MANIFEST_COLUMNS, MANIFEST_NAME
    from hsqformer.files import write_csv

    try:
        rows = build_manifest(staging, entry.layout)
    except HSQformerError as err:
        raise HSQformerError(f"{entry.name}: {err}; nothing was written to {target}") from None
    counts = dict(Counter(row["label"] for row in rows))
    expected = entry.layout.expected_images
    if counts != expected:
        raise HSQformerError(
            f"{entry.name}: the extracted files do not match the registry: expected {_counts_text(expected)} images, "
            f"found {_counts_text(counts) or 'none'}; nothing was written to {target}"
        )
    write_csv(staging / MANIFEST_NAME, pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)))
    return {label: counts[label] for label in expected}


def _check_readable(staging: Path, target: Path, name: str) -> list[str]:
    """Read the new dataset as the tools will (every image decoded); returns the loader's warnings.

    Messages name the final folder, not the staging one.
    """
    from hsqformer.data.manifest import load_dataset

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            load_dataset(staging, verify_images=True)
        except HSQformerError as err:
            raise HSQformerError(
                f"{name}: {str(err).replace(str(staging), str(target))}; nothing was written to {target}"
            ) from None
    return list(dict.fromkeys(str(w.message).replace(str(staging), str(target)) for w in caught))


def _write_provenance(
    staging: Path, entry: DatasetEntry, archives: list[tuple[RemoteFile, Path, str]], counts: dict[str, int]
) -> None:
    from importlib.metadata import version

    from hsqformer.files import write_json

    files = []
    for remote, path, digest in archives:
        checked = remote.checksum
        files.append({
            "url": remote.url,
            "name": remote.name,
            "bytes": path.stat().st_size,
            "sha256": digest,
            "checked_against": f"{checked[0]} {checked[1]}" if checked else None,
            "checksum_source": remote.checksum_source,
        })
    write_json(staging / PROVENANCE_NAME, {
        "format": PROVENANCE_FORMAT,
        "name": entry.name,
        "title": entry.title,
        "homepage": entry.homepage,
        "license": entry.license,
        "citation": entry.citation,
        "verified": entry.verifiable,
        "images": counts,
        "files": files,
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hsqformer": version("hsqformer"),
    })


def _publish(staging: Path, target: Path, overwrite: bool) -> None:
    """Move the finished staging folder to ``target`` in one rename; an old fetch is replaced only now."""
    _check_target(target, overwrite)  # again: the folder may have appeared during the download
    if not target.exists():
        os.rename(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".replaced", dir=target.parent))
    os.replace(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HSQformerError(f"cannot make the folder {folder}: {err.strerror or err}") from None


def _remove_empty(*folders: Path) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{label} {n}" for label, n in counts.items())
