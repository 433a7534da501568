"""Bad input for dicom2png: listed in errors.csv with a reason, the batch goes on, exit status says so."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_fixtures import Patient, liver_pngs, make_us_case
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from typer.testing import CliRunner

from hsqformer.cli import build_app
from hsqformer.dicom.convert import ConvertOptions, convert_tree
from hsqformer.errors import HSQformerError


def read_errors(out_dir: Path, summary) -> dict[str, str]:
    """errors.csv by input path: the file names inputs by pseudonym, the summary maps them back."""
    with (out_dir / "errors.csv").open(newline="", encoding="utf-8") as handle:
        by_id = {row["input"]: row["reason"] for row in csv.DictReader(handle)}
    assert len(by_id) == len(summary.failures)
    return {source: by_id[input_id] for source, input_id, _ in summary.failures}


@pytest.fixture()
def mixed_dir(tmp_path) -> Path:
    """Two good ultrasound files next to every kind of bad input."""
    in_dir = tmp_path / "in"
    pngs = liver_pngs()
    make_us_case(pngs[0], in_dir / "good" / "a.dcm")
    good = make_us_case(pngs[1], in_dir / "good" / "b")
    bad = in_dir / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("DOE^JANE called about the exam\n")
    (bad / "random.dcm").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    data = good.path.read_bytes()
    (bad / "truncated.dcm").write_bytes(data[: len(data) // 2])
    ds = pydicom.dcmread(good.path)
    del ds.PixelData
    ds.save_as(bad / "no_pixels.dcm")
    ds = pydicom.dcmread(good.path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    ds.PixelData = encapsulate([bytes(1000)])
    ds.save_as(bad / "mpeg2.dcm")
    shutil.copy(get_testdata_file("JPEG-lossy.dcm", download=False), bad / "corrupt_jpeg.dcm")
    shutil.copy(get_testdata_file("SC_rgb_rle_32bit.dcm", download=False), bad / "rgb32.dcm")
    shutil.copy(get_testdata_file("DICOMDIR", download=False), in_dir / "DICOMDIR")  # an index, skipped
    return in_dir


def test_each_bad_input_is_listed_with_its_reason_and_good_files_convert(mixed_dir, tmp_path) -> None:
    before = {p: p.read_bytes() for p in mixed_dir.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    summary = convert_tree(mixed_dir, out, ConvertOptions(salt="s", detect_text=False), workers=1, progress=False)
    errors = read_errors(out, summary)
    assert summary.converted == 2 and summary.failed == 7 and summary.skipped == 1
    assert errors["bad/notes.txt"] == "not a DICOM file"
    assert errors["bad/random.dcm"] == "not a DICOM file"
    assert errors["bad/no_pixels.dcm"] == "no pixel data"
    assert errors["bad/mpeg2.dcm"].startswith("unsupported transfer syntax MPEG2")
    assert errors["bad/truncated.dcm"]  # header or pixel data cut short
    assert errors["bad/corrupt_jpeg.dcm"].startswith("cannot decode pixel data")
    assert errors["bad/rgb32.dcm"].startswith("32-bit pixel data")
    assert len(list((out / "images").glob("*.png"))) == 2
    # No header value leaks through a reason, and the originals are untouched.
    text = (out / "errors.csv").read_text()
    assert all(value not in text for value in Patient().header_values())
    assert all(name not in text for name in ("notes", "random", "truncated", "corrupt_jpeg", "bad/"))  # nor file names
    assert {p: p.read_bytes() for p in mixed_dir.rglob("*") if p.is_file()} == before


def test_cli_exit_status_reports_failures(mixed_dir, tmp_path) -> None:
    runner = CliRunner()
    args = ["dicom2png", str(mixed_dir), str(tmp_path / "out"), "--no-detect-text", "--workers", "1", "--salt", "s"]
    failed = runner.invoke(build_app(), args)
    assert failed.exit_code == 1, failed.output
    assert "7 failed" in failed.output and "errors.csv" in failed.output
    assert "DOE" not in failed.output and "HX20230405" not in failed.output
    shutil.rmtree(mixed_dir / "bad")
    clean = runner.invoke(build_app(), [*args[:2], str(tmp_path / "out2"), *args[3:]])
    assert clean.exit_code == 0, clean.output


def test_existing_outputs_are_not_overwritten_without_overwrite(tmp_path) -> None:
    in_dir, out = tmp_path / "in", tmp_path / "out"
    make_us_case(liver_pngs()[2], in_dir / "x.dcm")
    options = ConvertOptions(salt="s", detect_text=False)
    convert_tree(in_dir, out, options, workers=1, progress=False)
    png = next((out / "images").glob("*.png"))
    png.write_bytes(b"user's own file")
    with pytest.raises(HSQformerError, match="manifest.csv already exists"):
        convert_tree(in_dir, out, options, workers=1, progress=False)
    for name in ("manifest.csv", "report.csv", "errors.csv"):
        (out / name).unlink()
    summary = convert_tree(in_dir, out, options, workers=1, progress=False)
    assert summary.failed == 1 and "already exists" in read_errors(out, summary)["x.dcm"]
    assert png.read_bytes() == b"user's own file"
    summary = convert_tree(in_dir, out, ConvertOptions(salt="s", detect_text=False, overwrite=True), workers=1, progress=False)
    assert summary.failed == 0 and png.read_bytes().startswith(b"\x89PNG")


def test_unusable_arguments_fail_before_any_work(tmp_path) -> None:
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    options = ConvertOptions(salt="s", detect_text=False)
    with pytest.raises(HSQformerError, match="does not exist"):
        convert_tree(tmp_path / "missing", tmp_path / "out", options, workers=1, progress=False)
    with pytest.raises(HSQformerError, match="outside OUT_DIR"):
        convert_tree(in_dir, tmp_path / "out", options, workers=1, progress=False, key_file=tmp_path / "out" / "key.json")
    with pytest.raises(HSQformerError, match="--frames"):
        convert_tree(in_dir, tmp_path / "out", ConvertOptions(salt="s", frames="1,x"), workers=1, progress=False)
    assert not (tmp_path / "out" / "manifest.csv").exists()
