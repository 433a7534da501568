"""End-to-end ``hsqformer dicom2png`` on ultrasound DICOMs built from liver-sysu images (from stand-ins made of the
embedded sample on a clone without ../shared/data)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dicom_fixtures import Patient, UsCase, liver_pngs, make_us_case, read_png, write_us_dicom
from pydicom.uid import RLELossless

from hsqformer.dicom.convert import ConvertOptions, convert_tree

SALT = "test-salt-1"
OTHER = Patient(name="ROE^RICHARD", patient_id="ZK7781234", birth_date="19550717", study_date="20220111",
                institution="LAKESIDE CLINIC", operator="BROWN^EVA", accession="ACC112233")


def without_pixel_data(blob: bytes) -> bytes:
    """A PNG's bytes less its compressed pixel data (IDAT payloads), in which a short value such as 'DOE' turns up
    by chance (3 given bytes occur in ~2 % of 300 kB files); metadata chunks, where a leak would be, stay."""
    if not blob.startswith(b"\x89PNG\r\n\x1a\n"):
        return blob
    kept, at = [blob[:8]], 8
    while at + 8 <= len(blob):
        length, kind = int.from_bytes(blob[at:at + 4], "big"), blob[at + 4:at + 8]
        end = at + 12 + length
        kept.append(blob[at:at + 8] + (b"" if kind == b"IDAT" else blob[at + 8:end]))
        at = end
    return b"".join(kept)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the real CLI in a child process, so worker output is captured too."""
    code = "from hsqformer.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Six single-frame files (two patients, both classes, with and without regions) and a 3-frame cine."""
    root = tmp_path_factory.mktemp("dicom_batch")
    in_dir, out_dir, key = root / "in", root / "out", root / "secret" / "key.json"
    pngs = liver_pngs()
    benign = [p for p in pngs if p.parent.name == "benign"][:3]
    malignant = [p for p in pngs if p.parent.name == "malignant"][:3]
    cases: list[UsCase] = []
    for i, png in enumerate(benign + malignant):
        patient = Patient() if i % 2 == 0 else OTHER
        cases.append(
            make_us_case(png, in_dir / png.parent.name / f"IMG{i:03d}", patient, with_region=i % 3 != 0, text_in_scan=i % 3 == 1)
        )
    # A grey cine loop, RLE compressed, with its region sequence.
    cine_case = make_us_case(malignant[0], root / "scratch.dcm", with_region=True, text_in_scan=True)
    grey = cine_case.frame[..., 0]
    cine = np.stack([grey, np.roll(grey, 3, axis=1), np.roll(grey, 6, axis=1)])
    cine_path = in_dir / "malignant" / "LOOP1.dcm"
    write_us_dicom(cine_path, cine, Patient(), region=cine_case.region, photometric="MONOCHROME2", transfer_syntax=RLELossless)
    originals = {p: p.read_bytes() for p in in_dir.rglob("*") if p.is_file()}
    result = run_cli("dicom2png", str(in_dir), str(out_dir), "--label-from", "parent", "--salt", SALT,
                     "--key-file", str(key), "--workers", "2")
    key_data = json.loads(key.read_text()) if key.exists() else {}
    by_source = {}
    for entry in key_data.get("images", []):
        by_source.setdefault(entry["source"], []).append(entry)
    return {
        "in": in_dir, "out": out_dir, "key": key, "cases": cases, "cine": (cine_path, cine, cine_case.region),
        "originals": originals, "result": result, "key_data": key_data, "by_source": by_source,
    }


def output_of(batch, case: UsCase) -> np.ndarray:
    entries = batch["by_source"][case.path.relative_to(batch["in"]).as_posix()]
    assert len(entries) == 1
    return read_png(batch["out"] / entries[0]["path"])


def expected_view(case: UsCase, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x0, y0, x1, y1 = case.region or (0, 0, image.shape[1], image.shape[0])
    return image[y0:y1, x0:x1], case.text_mask[y0:y1, x0:x1]


def test_batch_succeeds_and_writes_the_training_manifest(batch) -> None:
    result = batch["result"]
    assert result.returncode == 0, result.stderr
    rows = read_csv(batch["out"] / "manifest.csv")
    assert list(rows[0]) == ["path", "label", "patient_id", "center"]
    assert len(rows) == 6 + 3
    assert sorted({r["label"] for r in rows}) == ["benign", "malignant"]
    assert all((batch["out"] / r["path"]).is_file() for r in rows)
    assert read_csv(batch["out"] / "errors.csv") == []
    assert "9 PNGs" in result.stdout and "0 failed" in result.stdout


def test_patient_pseudonyms_group_images_by_patient(batch) -> None:
    rows = read_csv(batch["out"] / "manifest.csv")
    entries = {e["path"]: e for e in batch["key_data"]["images"]}
    by_patient: dict[str, set[str]] = {}
    for row in rows:
        by_patient.setdefault(entries[row["path"]]["patient_id"], set()).add(row["patient_id"])
    assert set(by_patient) == {Patient().patient_id, OTHER.patient_id}
    assert all(len(v) == 1 for v in by_patient.values())
    assert by_patient[Patient().patient_id] != by_patient[OTHER.patient_id]


def test_no_header_value_appears_in_any_output_or_log(batch) -> None:
    values = set(Patient().header_values()) | set(OTHER.header_values())
    outputs = [p for p in batch["out"].rglob("*") if p.is_file()]
    assert len(outputs) == 9 + 3
    blobs = {p.relative_to(batch["out"]).as_posix(): without_pixel_data(p.read_bytes()) for p in outputs}
    blobs["<stdout+stderr>"] = (batch["result"].stdout + batch["result"].stderr).encode()
    uids = {e["sop_instance_uid"] for e in batch["key_data"]["images"]}
    for name, blob in blobs.items():
        for value in values | uids:
            assert value.encode() not in blob, f"{value!r} leaked into {name}"
            assert value.encode() not in name.encode()


def test_drawn_patient_text_is_masked(batch) -> None:
    checked = 0
    for case in batch["cases"]:
        out = output_of(batch, case)
        _, text = expected_view(case, case.frame)
        if text.any():
            checked += 1
            assert not np.any(out[text]), f"text pixels left in {case.path.name}"
    assert checked >= 4  # every uncropped frame and every scan with text inside


def test_crop_matches_the_region_sequence_and_is_lossless_outside_masks(batch) -> None:
    report = {r["path"]: r for r in read_csv(batch["out"] / "report.csv")}
    for case in batch["cases"]:
        out = output_of(batch, case)
        source, _ = expected_view(case, case.frame)
        assert out.shape == source.shape and out.dtype == np.uint8
        masked = np.all(out == 0, axis=-1)
        np.testing.assert_array_equal(out[~masked], source[~masked])
        # Masks stay small: the text, not the anatomy.
        assert masked.mean() - np.all(source == 0, axis=-1).mean() < 0.05
        entry = batch["by_source"][case.path.relative_to(batch["in"]).as_posix()][0]
        assert report[entry["path"]]["cropped"] == str(int(case.region is not None))


def test_cine_gives_one_lossless_16bit_free_png_per_frame(batch) -> None:
    path, cine, (x0, y0, x1, y1) = batch["cine"]
    entries = sorted(batch["by_source"][path.relative_to(batch["in"]).as_posix()], key=lambda e: e["frame"])
    assert [e["frame"] for e in entries] == [0, 1, 2]
    for entry in entries:
        out = read_png(batch["out"] / entry["path"])
        assert entry["path"].endswith(f"_f{entry['frame']:04d}.png")
        source = cine[entry["frame"], y0:y1, x0:x1]
        assert out.shape == source.shape and out.dtype == np.uint8
        masked = out == 0
        np.testing.assert_array_equal(out[~masked], source[~masked])


def test_key_file_maps_back_and_rerun_needs_overwrite(batch, tmp_path) -> None:
    key = batch["key_data"]
    assert key["salt"] == SALT and len(key["images"]) == 9
    before = {p: p.read_bytes() for p in batch["out"].rglob("*") if p.is_file()}
    again = run_cli("dicom2png", str(batch["in"]), str(batch["out"]), "--salt", SALT, "--no-detect-text")
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert {p: p.read_bytes() for p in batch["out"].rglob("*") if p.is_file()} == before
    # Originals are never modified.
    assert {p: p.read_bytes() for p in batch["in"].rglob("*") if p.is_file()} == batch["originals"]


def test_same_salt_gives_the_same_names_and_detection_can_be_turned_off(batch, tmp_path) -> None:
    summary = convert_tree(batch["in"], tmp_path / "plain", ConvertOptions(salt=SALT, detect_text=False), workers=1, progress=False)
    assert summary.images == 9 and summary.masked_regions == 0
    names = {r["path"] for r in read_csv(tmp_path / "plain" / "manifest.csv")}
    assert names == {r["path"] for r in read_csv(batch["out"] / "manifest.csv")}
    case = next(c for c in batch["cases"] if c.region is None)
    entry = batch["by_source"][case.path.relative_to(batch["in"]).as_posix()][0]
    np.testing.assert_array_equal(read_png(tmp_path / "plain" / entry["path"]), case.frame)
    assert {r["label"] for r in read_csv(tmp_path / "plain" / "manifest.csv")} == {""}


def test_frames_option_and_the_data_pipeline_reads_the_output(batch, tmp_path) -> None:
    out = tmp_path / "middle"
    options = ConvertOptions(salt=SALT, frames="middle", detect_text=False, label_from_parent=True, center="SITE-A")
    convert_tree(batch["in"], out, options, workers=1, progress=False)
    rows = read_csv(out / "manifest.csv")
    assert len(rows) == 7 and sum(r["path"].endswith("_f0001.png") for r in rows) == 1
    assert {r["center"] for r in rows} == {"SITE-A"}
    from hsqformer.data.manifest import load_dataset

    frame = load_dataset(out)
    assert len(frame) == 7 and set(frame["label"]) == {"benign", "malignant"}
    assert frame["patient_id"].nunique() == 2
