"""``hsqformer data list`` / ``data fetch``: download, resume, verification, safe extraction, manifest.

Everything runs offline: each test starts an HTTP server on 127.0.0.1 (a free port, in a thread,
shut down at the end) that serves a tiny archive built in ``tmp_path``, and points ``fetch`` at it
with a test registry (``--registry FILE``). The server counts the requests it answers, so the tests
also show that refusals happen before any download and that a resume asks only for the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from PIL import Image

from hsqformer.cli import main
from hsqformer.data import load_dataset
from hsqformer.data.fetch import extract
from hsqformer.data.registry import load_registry
from hsqformer.errors import HSQformerError

#: The fixture set: class folder -> image stems (each also gets a mask that the manifest must skip).
IMAGES = {"benign": ["B_1", "B_2"], "malignant": ["M_1", "M_2", "M_3"]}


@dataclass
class Served:
    """What the local server serves (path -> bytes), how it misbehaves, and the requests it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> body bytes sent before hanging up, once
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


class _Handler(BaseHTTPRequestHandler):
    """GET with single open-ended ``Range: bytes=N-`` support; HTTP/1.0, so each response ends the connection."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        served: Served = self.server.served  # type: ignore[attr-defined]
        served.requests.append((self.path, self.headers.get("Range")))
        body = served.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if wanted:
            start = int(wanted.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        rest = body[start:]
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        cut = served.cut_after.pop(self.path, None)
        self.wfile.write(rest if cut is None else rest[:cut])  # a cut response hangs up mid-body

    def log_message(self, *args: object) -> None:
        """Keep the test output clean."""


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Served]]:
    """``(base URL, Served)`` of a server on 127.0.0.1 that lives for one test."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.served = Served()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.served  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
    assert len(httpd.served.requests) <= 4  # type: ignore[attr-defined]  # no test retries in a loop


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 6), value).save(buffer, format="PNG")
    return buffer.getvalue()


def fixture_zip(extra: dict[str, bytes] | None = None) -> bytes:
    """A zip laid out like a real release: a top folder, class folders with images and masks, clutter."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("TinySet/README.txt", "about the set")
        archive.writestr("notes-outside-root.txt", "not part of the set")
        archive.writestr("__MACOSX/TinySet/benign/._B_1.png", b"\x00\x05")
        for i, (folder, stems) in enumerate(IMAGES.items()):
            for j, stem in enumerate(stems):
                archive.writestr(f"TinySet/{folder}/{stem}.png", png_bytes(40 * i + 10 * j))
                archive.writestr(f"TinySet/{folder}/{stem}_mask.png", png_bytes(255))
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def write_registry(path: Path, url: str, *, sha256: str | None, expected: dict[str, int] | None = None) -> Path:
    """A registry with one dataset, ``tiny``, served from ``url``."""
    entry = {
        "title": "Tiny test set",
        "homepage": "http://127.0.0.1/",
        "license": "CC0 (test data)",
        "citation": "The test suite, 2025.",
        "files": [{
            "url": url, "name": "tiny.zip", "format": "zip", "size_bytes": None,
            "sha256": sha256, "checksum_source": "the test fixture" if sha256 else "none published",
        }],
        "layout": {
            "root": "TinySet",
            "classes": {"Benign": "benign", "malignant": "malignant"},  # matched ignoring case
            "exclude": ["*_mask*"],
            "patient_id": "{stem}",
            "center": "TEST",
            "expected_images": expected or {label: len(stems) for label, stems in IMAGES.items()},
        },
    }
    path.write_text(yaml.safe_dump({"format": "hsqformer-data-registry/1", "datasets": {"tiny": entry}}), encoding="utf-8")
    return path


def run_cli(*args: object) -> tuple[int, str, str]:
    """Run the ``hsqformer`` entry point in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["hsqformer", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    """The single ``error: ...`` line of stderr (asserting that it is the only line)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def tiny(tmp_path: Path, server: tuple[str, Served]) -> tuple[Path, Served, bytes]:
    """A served fixture archive and a registry that names its true sha256: (registry, served, archive)."""
    base, served = server
    archive = fixture_zip()
    served.files["/tiny.zip"] = archive
    registry = write_registry(tmp_path / "registry.yaml", f"{base}/tiny.zip", sha256=hashlib.sha256(archive).hexdigest())
    return registry, served, archive


def test_list_shows_the_registry_entries(tiny: tuple[Path, Served, bytes]) -> None:
    code, out, _ = run_cli("data", "list")
    assert code == 0
    for name in ("hsqformer-liver", "aul", "busi"):
        assert re.search(rf"^{name}: \d+ images", out, re.M), out
    assert "no published checksum (needs --accept-unverified)" in out and "md5 published" in out
    assert "holds back for independent checks" in out  # the caveats are shown, not only kept in the file
    registry, served, _ = tiny
    code, out, _ = run_cli("data", "list", "--registry", registry)
    assert code == 0 and out.startswith("tiny: 5 images (benign 2, malignant 3); size not published; sha256 published")
    assert served.requests == []  # listing downloads nothing


def test_package_registry_states_no_checksum_it_does_not_have() -> None:
    registry = load_registry()
    assert {"hsqformer-liver", "aul", "busi"} <= set(registry)
    for entry in registry.values():
        for remote in entry.files:
            assert remote.url.startswith("https://") and remote.checksum_source
            if remote.checksum is None:
                assert "none published" in remote.checksum_source
    assert not registry["hsqformer-liver"].verifiable and not registry["busi"].verifiable
    assert registry["aul"].verifiable and {f.checksum[0] for f in registry["aul"].files} == {"md5"}  # type: ignore[index]


def test_fetch_downloads_verifies_extracts_and_writes_a_manifest(tmp_path: Path, tiny: tuple[Path, Served, bytes]) -> None:
    registry, served, archive = tiny
    to = tmp_path / "sets"
    code, out, err = run_cli("data", "fetch", "tiny", "--to", to, "--registry", registry)
    assert code == 0, err
    folder = to / "tiny"
    assert f"tiny: 5 images (benign 2, malignant 3) in {folder}" in out
    assert f"sha256 {hashlib.sha256(archive).hexdigest()}  tiny.zip (verified against the published checksum)" in out
    assert "cite: The test suite, 2025." in out
    frame = load_dataset(folder)  # the tools read the new set as it is
    assert frame["label"].value_counts().to_dict() == {"malignant": 3, "benign": 2}
    assert sorted(frame["patient_id"]) == ["B_1", "B_2", "M_1", "M_2", "M_3"] and set(frame["center"]) == {"TEST"}
    manifest = (folder / "manifest.csv").read_text(encoding="utf-8").splitlines()
    assert manifest[:2] == ["path,label,patient_id,center", "benign/B_1.png,benign,B_1,TEST"]  # root prefix dropped
    assert (folder / "benign" / "B_1_mask.png").is_file() and not any("mask" in line for line in manifest)
    assert (folder / "README.txt").is_file() and not (folder / "notes-outside-root.txt").exists()
    assert not list(folder.rglob("._*")) and not (folder / "__MACOSX").exists()
    record = json.loads((folder / "fetch.json").read_text(encoding="utf-8"))
    assert record["verified"] is True and record["images"] == {"benign": 2, "malignant": 3}
    assert record["files"][0]["sha256"] == hashlib.sha256(archive).hexdigest() and record["license"] == "CC0 (test data)"
    assert sorted(p.name for p in to.iterdir()) == ["tiny"]  # no downloads, .part or staging folders left
    assert served.requests == [("/tiny.zip", None)]


def test_checksum_mismatch_is_one_line_and_leaves_nothing_claiming_success(
    tmp_path: Path, server: tuple[str, Served]
) -> None:
    base, served = server
    published, tampered = fixture_zip(), fixture_zip(extra={"TinySet/benign/B_9.png": png_bytes(7)})
    served.files["/tiny.zip"] = tampered
    registry = write_registry(tmp_path / "registry.yaml", f"{base}/tiny.zip", sha256=hashlib.sha256(published).hexdigest())
    to = tmp_path / "sets"
    (to / "other").mkdir(parents=True)
    (to / "other" / "keep.txt").write_text("a user's file")
    code, _, err = run_cli("data", "fetch", "tiny", "--to", to, "--registry", registry)
    assert code == 2
    line = one_error_line(err)
    assert (f"sha256 mismatch for tiny.zip from {base}/tiny.zip: expected {hashlib.sha256(published).hexdigest()}, "
            f"got {hashlib.sha256(tampered).hexdigest()}") in line
    assert not (to / "tiny").exists() and not list(to.rglob("fetch.json")) and not list(to.rglob("manifest.csv"))
    assert (to / "other" / "keep.txt").read_text() == "a user's file"
    rejected = to / ".downloads" / "tiny" / "tiny.zip.rejected"
    assert rejected.read_bytes() == tampered and f"kept as {rejected}" in line
    assert [p.name for p in (to / ".downloads" / "tiny").iterdir()] == ["tiny.zip.rejected"]  # nothing to resume


def test_interrupted_download_keeps_the_part_file_and_resumes_with_range(
    tmp_path: Path, tiny: tuple[Path, Served, bytes]
) -> None:
    registry, served, archive = tiny
    half = len(archive) // 2
    served.cut_after["/tiny.zip"] = half
    to = tmp_path / "sets"
    code, _, err = run_cli("data", "fetch", "tiny", "--to", to, "--registry", registry)
    assert code == 2
    part = to / ".downloads" / "tiny" / "tiny.zip.part"
    line = one_error_line(err)
    assert f"interrupted after {half} of {len(archive)} bytes" in line and f"{part} is kept" in line
    assert part.read_bytes() == archive[:half] and not (to / "tiny").exists()

    code, _, err = run_cli("data", "fetch", "tiny", "--to", to, "--registry", registry)
    assert code == 0, err
    assert served.requests == [("/tiny.zip", None), ("/tiny.zip", f"bytes={half}-")]  # only the rest was asked for
    assert json.loads((to / "tiny" / "fetch.json").read_text())["files"][0]["sha256"] == hashlib.sha256(archive).hexdigest()
    assert not part.exists()


def test_a_complete_part_file_is_finished_without_downloading_it_again(
    tmp_path: Path, tiny: tuple[Path, Served, bytes]
) -> None:
    registry, served, archive = tiny
    to = tmp_path / "sets"
    part = to / ".downloads" / "tiny" / "tiny.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(archive)  # e.g. interrupted after the last byte, before the rename
    code, _, err = run_cli("data", "fetch", "tiny", "--to", to, "--registry", registry)
    assert code == 0, err
    assert served.requests == [("/tiny.zip", f"bytes={len(archive)}-")]  # answered 416: nothing left to send
    assert (to / "tiny" / "manifest.csv").is_file()


def test_an_existing_dataset_folder_is_never_overwritten_without_overwrite(
    tmp_path: Path, tiny: tuple[Path, Served, bytes]
) -> None:
    registry, served, _ = tiny
    to = tmp_path / "sets"
    own = to / "tiny" / "mine.txt"
    own.parent.mkdir(parents=True)
    own.write_text("someone's own data")
    code, _, err = run_cli("data", "fetch", "tiny", "--to", to, "--registry", registry)
    assert code == 2 and f"{to / 'tiny'} already exists; pass --overwrite" in one_error_line(err)
    code, _, err = run_cli("data", "fetch", "tiny", "--to", to, "--registry", registry, "--overwrite")
    assert code == 2 and "not made by it; not replacing it" in one_error_line(err)  # not a folder fetch made
    assert own.read_text() == "someone's own data" and served.requests == []  # refused before downloading

    own.unlink()
    assert run_cli("data", "fetch", "tiny", "--to", to, "--registry", registry)[0] == 0
    code, _, err = run_cli("data", "fetch", "tiny", "--to", to, "--registry", registry)
    assert code == 2 and "already exists" in one_error_line(err)
    (to / "tiny" / "benign" / "B_1.png").write_bytes(b"damaged")
    code, _, err = run_cli("data", "fetch", "tiny", "--to", to, "--registry", registry, "--overwrite")
    assert code == 0, err  # a set made by fetch is replaced, as a whole
    assert (to / "tiny" / "benign" / "B_1.png").read_bytes() != b"damaged" and len(served.requests) == 2
    assert sorted(p.name for p in to.iterdir()) == ["tiny"]


def test_without_a_published_checksum_fetch_needs_accept_unverified(
    tmp_path: Path, tiny: tuple[Path, Served, bytes], server: tuple[str, Served]
) -> None:
    _, served, archive = tiny
    registry = write_registry(tmp_path / "unverified.yaml", f"{server[0]}/tiny.zip", sha256=None)
    to = tmp_path / "sets"
    code, _, err = run_cli("data", "fetch", "tiny", "--to", to, "--registry", registry)
    assert code == 2
    line = one_error_line(err)
    digest = hashlib.sha256(archive).hexdigest()
    assert "no published checksum" in line and f"tiny.zip {digest}" in line and "--accept-unverified" in line
    assert "layout checks passed (benign 2, malignant 3)" in line
    assert not (to / "tiny").exists() and (to / ".downloads" / "tiny" / "tiny.zip").read_bytes() == archive

    code, out, err = run_cli("data", "fetch", "tiny", "--to", to, "--registry", registry, "--accept-unverified")
    assert code == 0, err
    assert f"sha256 {digest}  tiny.zip (NOT verified: no published checksum)" in out
    record = json.loads((to / "tiny" / "fetch.json").read_text())
    assert record["verified"] is False and record["files"][0]["sha256"] == digest
    assert record["files"][0]["checked_against"] is None
    assert len(served.requests) == 1  # the kept download was used, not fetched again


def test_archive_that_does_not_match_the_registry_layout_is_refused(
    tmp_path: Path, tiny: tuple[Path, Served, bytes], server: tuple[str, Served]
) -> None:
    archive = tiny[2]
    registry = write_registry(tmp_path / "counts.yaml", f"{server[0]}/tiny.zip",
                              sha256=hashlib.sha256(archive).hexdigest(), expected={"benign": 3, "malignant": 3})
    to = tmp_path / "sets"
    code, _, err = run_cli("data", "fetch", "tiny", "--to", to, "--registry", registry)
    assert code == 2
    assert ("tiny: the extracted files do not match the registry: expected benign 3, malignant 3 images, "
            f"found benign 2, malignant 3; nothing was written to {to / 'tiny'}") in one_error_line(err)
    assert not (to / "tiny").exists() and not [p for p in to.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("member", ["TinySet/benign/../../../evil.png", "/tmp/evil.png", "..\\..\\evil.png"])
def test_zip_member_outside_the_folder_refuses_the_whole_archive(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(fixture_zip(extra={member: png_bytes(1)}))
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(HSQformerError, match=r"unsafe member .*evil\.png.*nothing was extracted"):
        extract(archive, "zip", into, "TinySet")
    assert not any(into.iterdir()) and not list(tmp_path.parent.rglob("evil.png"))


def test_tar_archives_extract_and_one_with_a_link_is_refused(tmp_path: Path) -> None:
    data = png_bytes(3)
    for name, with_link in (("good.tar.gz", False), ("bad.tar.gz", True)):
        with tarfile.open(tmp_path / name, "w:gz") as tar:
            info = tarfile.TarInfo("TinySet/benign/B_1.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            if with_link:
                link = tarfile.TarInfo("TinySet/benign/B_2.png")
                link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(link)
        (tmp_path / name.split(".")[0]).mkdir()
    assert extract(tmp_path / "good.tar.gz", "tar.gz", tmp_path / "good", "TinySet") == 1
    assert (tmp_path / "good" / "benign" / "B_1.png").read_bytes() == data
    with pytest.raises(HSQformerError, match="is a link or special file; nothing was extracted"):
        extract(tmp_path / "bad.tar.gz", "tar.gz", tmp_path / "bad", "TinySet")
    assert not any((tmp_path / "bad").iterdir())


def test_malicious_archive_through_fetch(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    bad = fixture_zip(extra={"../../evil.png": png_bytes(1)})
    served.files["/tiny.zip"] = bad
    registry = write_registry(tmp_path / "registry.yaml", f"{base}/tiny.zip", sha256=hashlib.sha256(bad).hexdigest())
    to = tmp_path / "sets"
    code, _, err = run_cli("data", "fetch", "tiny", "--to", to, "--registry", registry)
    assert code == 2 and "unsafe member '../../evil.png'" in one_error_line(err)
    assert not (to / "tiny").exists() and not list(tmp_path.parent.rglob("evil.png"))


def test_unknown_name_and_bad_registry_are_one_line_errors(tmp_path: Path, tiny: tuple[Path, Served, bytes]) -> None:
    registry = tiny[0]
    code, _, err = run_cli("data", "fetch", "nope", "--registry", registry, "--to", tmp_path / "sets")
    assert code == 2 and one_error_line(err) == "error: unknown dataset 'nope'; known datasets: tiny"
    code, _, err = run_cli("data", "fetch", "nope", "--to", tmp_path / "sets")
    assert code == 2 and one_error_line(err).endswith("known datasets: hsqformer-liver, aul, busi")

    document = yaml.safe_load(registry.read_text())
    document["datasets"]["tiny"]["files"][0]["sha256"] = "not-a-digest"
    registry.write_text(yaml.safe_dump(document))
    code, _, err = run_cli("data", "list", "--registry", registry)
    assert code == 2
    assert one_error_line(err) == (f"error: dataset registry {registry}: dataset 'tiny', file 1: 'sha256' must be a hex "
                                   "digest of 64 digits, or null when none is published")
    assert not (tmp_path / "sets").exists()


def test_fetch_runs_without_torch_and_the_env_var_names_the_registry(
    tmp_path: Path, tiny: tuple[Path, Served, bytes]
) -> None:
    registry, served, _ = tiny
    to = tmp_path / "sets"
    code = (f"import sys; sys.argv = ['hsqformer', 'data', 'fetch', 'tiny', '--to', {str(to)!r}]\n"
            "from hsqformer.cli import main\ntry:\n    main()\nexcept SystemExit as exit_:\n    assert not exit_.code\n"
            "print(sorted(m for m in ('torch', 'timm', 'lightning', 'torchvision') if m in sys.modules))")
    env = {**os.environ, "HSQFORMER_DATA_REGISTRY": str(registry), "no_proxy": "127.0.0.1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (to / "tiny" / "manifest.csv").is_file() and len(served.requests) == 1
