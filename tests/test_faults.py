"""Fault injection: every failure is visible (one line, a non-zero exit status), nothing is lost, nothing leaks.

Signals mid-training, corrupt and foreign checkpoints, concurrent DICOM workers on duplicate
inputs, symlinked data, files that change between the check and their use, decompression
bombs, run folders that are not ours, and labels that would break reports.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from dicom_fixtures import liver_pngs, make_us_case
from shared_data import DATA, HAS_SHARED_DATA, sample_images
from test_cli_cv import SMOKE, last_line, run_cli, snapshot

from hsqformer.data import check_images, load_dataset
from hsqformer.dicom.convert import ConvertOptions, convert_tree
from hsqformer.errors import HSQformerError
from hsqformer.data.audit import run_audit
from hsqformer.training import engine, run_folder
from hsqformer.training.config import load_config

LIVER = DATA / "liver-sysu"
CLI = [sys.executable, "-c", "from hsqformer.cli import main; main()"]


# ---------------------------------------------------------------------------------------------- helpers


def image_rows(n_per_class: int) -> list[tuple[str, str, str, str]]:
    """Manifest rows (absolute path, label, patient, center) of the first benign and malignant images of
    liver-sysu, or of the embedded sample on a clone without ../shared/data (one patient per image)."""
    if not HAS_SHARED_DATA:
        return [(str(p), label, f"{label[0]}{i}", "sample") for label in ("benign", "malignant")
                for i, p in enumerate(sample_images(label, n_per_class))]
    frame = pd.read_csv(LIVER / "manifest.csv", dtype=str, keep_default_na=False)
    part = frame.groupby("label", group_keys=False).head(n_per_class)
    return [(str(LIVER / p), label, pid, c) for p, label, pid, c in part[["path", "label", "patient_id", "center"]].to_numpy()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A dataset folder of 12 + 12 images with a manifest.csv of relative paths (so that a symlink to the
    folder shows in every image path)."""
    folder = tmp_path_factory.mktemp("data") / "set"
    rows = []
    for i, (path, *rest) in enumerate(image_rows(12)):
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "images" / f"{i}.png").write_bytes(Path(path).read_bytes())
        rows.append((f"images/{i}.png", *rest))
    write_manifest(folder / "manifest.csv", rows)
    return folder


def write_manifest(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["path", "label", "patient_id", "center"]).to_csv(path, index=False)
    return path


def truncated_copy(source: Path, target: Path) -> Path:
    """``source`` cut to half its bytes: the header is intact, the pixel data is not."""
    data = Path(source).read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[: len(data) // 2])
    return target


def bomb_png(path: Path, side: int = 40_000) -> Path:
    """A PNG header announcing side x side pixels (1.6 G for the default): a decompression bomb in 60 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def start_run_folder(data: str | Path, out: Path, *overrides: str) -> engine.CVInputs:
    """A started (not yet trained) run folder, as ``cv`` leaves it before its first epoch."""
    inputs = engine.prepare_inputs(load_config(SMOKE, list(overrides)), data, {})
    engine._start_run_dir(out, inputs, "test")
    return inputs


def wait_for(predicate, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert predicate(), log.read_text()[-3000:]


# ---------------------------------------------------------------------------------------------- dicom2png


def read_manifest_paths(out: Path) -> list[str]:
    with (out / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        return [row["path"] for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def duplicated_dicoms(tmp_path_factory) -> Path:
    """Four instances in a/; IMG0 exported twice more and IMG1 once more (same SOP Instance UIDs) in b/ and c/."""
    in_dir = tmp_path_factory.mktemp("dups") / "in"
    pngs = liver_pngs()
    cases = [make_us_case(png, in_dir / "a" / f"IMG{i}.dcm", with_region=False) for i, png in enumerate(pngs[:4])]
    for copy in ("b/IMG0.dcm", "c/IMG0_reexport.dcm", "b/IMG1.dcm"):
        source = cases[0 if "IMG0" in copy else 1].path
        (in_dir / copy).parent.mkdir(parents=True, exist_ok=True)
        (in_dir / copy).write_bytes(source.read_bytes())
    return in_dir


@pytest.mark.parametrize("workers", [1, 2])
def test_duplicate_inputs_give_one_png_each_and_the_manifest_matches_the_files(duplicated_dicoms, tmp_path, workers):
    out = tmp_path / "out"
    for overwrite in (False, True):  # a second run over the first, with --overwrite
        options = ConvertOptions(salt="s", detect_text=False, overwrite=overwrite)
        summary = convert_tree(duplicated_dicoms, out, options, workers=workers, progress=False)
        listed = read_manifest_paths(out)
        on_disk = sorted(f"images/{p.name}" for p in (out / "images").iterdir())
        assert sorted(listed) == on_disk and len(set(listed)) == len(listed) == 4
        assert (summary.files, summary.converted, summary.images, summary.failed, summary.duplicates) == (7, 4, 4, 3, 3)
        reasons = {source: reason for source, _, reason in summary.failures}
        assert set(reasons) == {"b/IMG0.dcm", "c/IMG0_reexport.dcm", "b/IMG1.dcm"}
        assert all(r.startswith("duplicate of input-") for r in reasons.values())
        assert reasons["b/IMG0.dcm"].endswith("(first: a/IMG0.dcm)") and reasons["b/IMG1.dcm"].endswith("(first: a/IMG1.dcm)")
        with (out / "errors.csv").open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 3 and all(row["reason"].startswith("duplicate of input-") for row in rows)


def test_overwrite_removes_the_pngs_of_inputs_that_are_gone(tmp_path):
    in_dir, out = tmp_path / "in", tmp_path / "out"
    for i, png in enumerate(liver_pngs()[:2]):
        make_us_case(png, in_dir / f"{i}.dcm", with_region=False)
    convert_tree(in_dir, out, ConvertOptions(salt="s", detect_text=False), workers=1, progress=False)
    (in_dir / "1.dcm").unlink()
    (out / "images" / "mine.png").write_bytes(b"not listed by any manifest: kept")
    convert_tree(in_dir, out, ConvertOptions(salt="s", detect_text=False, overwrite=True), workers=1, progress=False)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        [Path(p).name for p in read_manifest_paths(out)] + ["mine.png"]
    ) and len(read_manifest_paths(out)) == 1


def test_key_file_is_private_and_no_input_name_reaches_out_dir(tmp_path):
    in_dir, out, key = tmp_path / "in", tmp_path / "out", tmp_path / "private" / "key.json"
    make_us_case(liver_pngs()[0], in_dir / "DOE_JANE_liver.dcm")
    (in_dir / "ROE_RICHARD_notes.txt").write_text("not an image")
    old_umask = os.umask(0o022)
    try:
        summary = convert_tree(in_dir, out, ConvertOptions(salt="s", detect_text=False), workers=1, progress=False, key_file=key)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not [p for p in key.parent.iterdir() if p != key]  # no temporary file left beside it
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"DOE_JANE" not in data and b"ROE_RICHARD" not in data, path
    failed = json.loads(key.read_text())["failed"]
    assert [(f["source"], f["input"]) for f in failed] == [(s, i) for s, i, _ in summary.failures]
    assert failed[0]["source"] == "ROE_RICHARD_notes.txt"


def test_dicom2png_refuses_an_empty_input_and_an_output_inside_the_input(tmp_path):
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    code, err = run_cli("dicom2png", tmp_path / "empty", tmp_path / "out", "--salt", "s")
    assert code == 2 and last_line(err).startswith("error: no input files in ")
    assert not (tmp_path / "out").exists()

    in_dir = tmp_path / "in"
    make_us_case(liver_pngs()[0], in_dir / "x.dcm")
    code, err = run_cli("dicom2png", in_dir, in_dir / "png", "--no-detect-text", "--salt", "s")
    assert code == 2 and "inside IN_DIR" in last_line(err) and "Traceback" not in err
    assert not (in_dir / "png").exists()


# ---------------------------------------------------------------------------------------------- image checks


def test_a_truncated_png_is_found_before_any_run_folder_exists(tmp_path):
    rows = image_rows(4)
    broken = truncated_copy(Path(rows[5][0]), tmp_path / "imgs" / "broken.png")
    with pytest.raises(HSQformerError):  # the header alone looks fine; decoding finds the cut
        check_images(pd.DataFrame({"path": [str(broken)]}))
    data = write_manifest(tmp_path / "data.csv", rows)
    rows[5] = (str(broken), *rows[5][1:])
    bad = write_manifest(tmp_path / "bad.csv", rows)
    for args in (["--data", bad], ["--data", data, "--test", f"held-out={bad}"]):
        out = tmp_path / "run"
        code, err = run_cli("cv", "--config", SMOKE, "--out", out, *args)
        assert code == 2 and last_line(err).startswith(f"error: unreadable image {broken} (row 6 of {bad}): "), err[-2000:]
        assert not out.exists()


def test_the_check_reports_the_first_bad_row_and_counts_the_others(tmp_path):
    rows = image_rows(3)
    rows[1] = (str(truncated_copy(Path(rows[1][0]), tmp_path / "t.png")), *rows[1][1:])
    rows[4] = (str(tmp_path / "gone.png"), *rows[4][1:])
    manifest = write_manifest(tmp_path / "data.csv", rows)
    with pytest.raises(HSQformerError) as info:
        load_dataset(manifest)
    message = str(info.value)
    assert message.startswith(f"unreadable image {tmp_path / 't.png'} (row 2 of {manifest}): ")
    assert message.endswith("(and 1 more missing or unreadable images)") and "\n" not in message


def test_labels_that_differ_only_by_case_or_spaces_are_refused(tmp_path):
    rows = image_rows(3)
    rows[4] = (rows[4][0], "Malignant", *rows[4][2:])
    with pytest.raises(HSQformerError, match=r"labels 'malignant' \(row 4 of .*\) and 'Malignant' \(row 5 of .*\) differ only"):
        load_dataset(write_manifest(tmp_path / "one.csv", rows), verify_images=False)
    a = write_manifest(tmp_path / "a.csv", image_rows(3))
    b = write_manifest(tmp_path / "b.csv", [(p, label.upper(), pid, c) for p, label, pid, c in image_rows(3)])
    with pytest.raises(HSQformerError, match="'benign' \\(set a\\) and 'BENIGN' \\(set b\\) differ only by case"):
        run_audit([a, b], n_folds=2, progress=False)


# ---------------------------------------------------------------------------------------------- audit


def test_audit_escapes_markdown_names_bad_rows_and_never_overwrites(tmp_path):
    rows = [(p, {"benign": "benign|cyst", "malignant": "malignant\nHCC"}[label], pid, "site|A") for p, label, pid, _ in image_rows(4)]
    manifest = write_manifest(tmp_path / "data.csv", rows)
    markdown = run_audit([manifest], n_folds=2, progress=False).to_markdown()
    table = markdown.split("images per class and center", 1)[1].split("##", 1)[0]
    table_rows = [line for line in table.splitlines() if line.startswith("|") and not line.startswith("|---")]
    assert len(table_rows) == 4 and all(line.count(" | ") == 2 for line in table_rows)  # class | site|A | total
    assert "| benign\\|cyst | 4 | 4 |" in table and "| malignant\\nHCC | 4 | 4 |" in table

    rows = image_rows(4)
    broken = truncated_copy(Path(rows[2][0]), tmp_path / "broken.png")
    rows[2] = (str(broken), *rows[2][1:])
    bad = write_manifest(tmp_path / "bad.csv", rows)
    report = tmp_path / "audit.md"
    report.write_text("my notes")
    code, err = run_cli("audit", bad, "--out", report)
    assert code == 2 and last_line(err) == f"error: --out {report} already exists; pass --overwrite to replace it"
    assert report.read_text() == "my notes"
    code, err = run_cli("audit", bad, "--out", report, "--overwrite", "--folds", "2")
    assert code == 2 and "Traceback" not in err
    assert last_line(err).startswith(f"error: unreadable image {broken} (row 3 of {bad}): ")
    assert report.read_text() == "my notes"


# ---------------------------------------------------------------------------------------------- run folders


def test_overwrite_deletes_only_folders_that_are_runs_and_nothing_more(tmp_path):
    run = tmp_path / "run"
    (run / "fold_0" / "logs" / "version_0").mkdir(parents=True)
    (run / "fold_0" / "lightning").mkdir()
    (run / "run.json").write_text(json.dumps({"format": run_folder.RUN_FORMAT}))
    for name in ("config.yaml", "splits.csv", ".metrics.json.x1y2.tmp", "fold_0/done.json", "fold_0/model.json",
                 "fold_0/logs/version_0/metrics.csv", "fold_0/lightning/last.ckpt"):
        (run / name).write_text("x")
    run_folder.check_run_dir(run, overwrite=True, resume=False)  # a run folder: may be replaced

    def refused(change) -> str:
        with pytest.raises(HSQformerError) as info:
            change()
            run_folder.check_run_dir(run, overwrite=True, resume=False)
        return str(info.value)

    assert "notes.txt is not something hsqformer cv writes; not deleting" in refused(lambda: (run / "notes.txt").write_text("mine"))
    (run / "notes.txt").unlink()
    assert "fold_0/scan.png is not something" in refused(lambda: (run / "fold_0" / "scan.png").write_text("mine"))
    (run / "fold_0" / "scan.png").unlink()
    assert "data is not something" in refused(lambda: (run / "data").symlink_to(tmp_path))
    (run / "data").unlink()
    assert "not an hsqformer-cv-run/1 file" in refused(lambda: (run / "run.json").write_text('{"format": "other"}'))
    assert "cannot read" in refused(lambda: (run / "run.json").write_text("{not json"))

    (run / "run.json").write_text(json.dumps({"format": run_folder.RUN_FORMAT}))
    (run / "thesis.docx").write_text("mine")
    before = snapshot(run)
    code, err = run_cli("cv", "--config", SMOKE, "--data", tmp_path / "any", "--out", run, "--overwrite")
    assert code == 2 and last_line(err).startswith(f"error: --overwrite: {run / 'thesis.docx'} is not something")
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def module_state() -> dict[str, torch.Tensor]:
    return {"model.weight": torch.zeros(2, 3), "model.bias": torch.zeros(2)}


def lightning_like(state: dict[str, torch.Tensor]) -> dict:
    return {"state_dict": state, "epoch": 0, "global_step": 1, "loops": {}, "optimizer_states": []}


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (lambda path, state: path.write_bytes(b"\x00garbage" * 100), "unreadable checkpoint (damaged, cut short"),
        (lambda path, state: torch.save(argparse.Namespace(evil=1), path), "objects other than tensors and plain data"),
        (lambda path, state: torch.save({"weight": torch.zeros(2)}, path), "not a Lightning checkpoint"),
        (lambda path, state: torch.save(lightning_like({"other.weight": torch.zeros(1)}), path), "weights have other names"),
        (lambda path, state: torch.save(lightning_like({**state, "model.bias": torch.zeros(5)}), path), "'model.bias' has another shape"),
    ],
)
def test_a_corrupt_or_foreign_checkpoint_is_refused_in_one_line(tmp_path, module_state, content, why):
    path = tmp_path / "last.ckpt"
    content(path, module_state)
    with pytest.raises(HSQformerError) as info:
        engine.check_resume_checkpoint(path, module_state, 1)
    message = str(info.value)
    assert message.startswith(f"fold 1: cannot resume from {path}: ") and why in message
    assert "delete that file to restart fold 1" in message and "weights_only" not in message and "\n" not in message
    torch.save(lightning_like(module_state), path)
    engine.check_resume_checkpoint(path, module_state, 1)  # the real thing passes


def test_resume_through_a_symlink_reaches_the_checkpoint_and_refuses_a_corrupt_one(tmp_path, data_dir):
    link = tmp_path / "data-link"
    link.symlink_to(data_dir, target_is_directory=True)
    out = tmp_path / "run"
    start_run_folder(link, out)
    splits = pd.read_csv(out / "splits.csv")
    assert splits["path"].str.startswith(str(link)).all()  # as given; run.json has the resolved path
    assert json.loads((out / "run.json").read_text())["data"] == str(data_dir.resolve())
    last = out / "fold_0" / "lightning" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 half a zip file")
    code, err = run_cli("cv", "--resume", "--out", out)
    assert code == 2 and "Traceback" not in err and "weights_only" not in err
    assert last_line(err).startswith(f"error: fold 0: cannot resume from {last}: unreadable checkpoint")  # not "folds differ"
    assert last.exists()


# ---------------------------------------------------------------------------------------------- signals


def test_sigterm_mid_training_exits_143_and_the_run_can_resume(tmp_path, data_dir):
    link = tmp_path / "data-link"
    link.symlink_to(data_dir, target_is_directory=True)
    out = tmp_path / "run"
    log = tmp_path / "cv.log"
    args = ["--config", str(SMOKE), "--data", str(link), "--out", str(out), "--set", "data.max_images=16"]
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*CLI, "cv", *args, "--set", "trainer.epochs=2"],
            stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        wait_for(lambda: (out / "fold_0" / "logs").exists(), process, log)  # Lightning is training fold 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text
    assert last_line(text) == f"interrupted by SIGTERM; finished folds are kept; continue with: hsqformer cv --out {out} --resume"
    assert not (out / "metrics.json").exists() and not (out / "fold_1" / "done.json").exists()

    # What --resume checks first passes although run.json holds the resolved data path and
    # splits.csv the symlinked one; the images keep the names they were given.
    cfg, data, tests = run_folder.resume_request(out)
    assert data == str(data_dir.resolve())
    inputs = engine.prepare_inputs(cfg, data, tests)
    engine._check_same_run(out, inputs)
    assert inputs.frame["path"].str.startswith(str(link)).all()


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to see the data-loader workers")
def test_sigterm_to_the_whole_process_group_with_loader_workers_exits_143(tmp_path, data_dir):
    """A scheduler ends the whole group: the workers die too, and their death must not turn into a traceback."""
    out = tmp_path / "run"
    log = tmp_path / "cv.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*CLI, "cv", "--config", str(SMOKE), "--data", str(data_dir), "--out", str(out),
             "--set", "data.max_images=16", "--set", "data.num_workers=2", "--set", "trainer.epochs=3"],
            stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        wait_for(lambda: (out / "fold_0" / "logs").exists() and len(_children(process.pid)) >= 2, process, log)
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=120) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert last_line(text).startswith("interrupted by SIGTERM; finished folds are kept; continue with: hsqformer cv")


def test_ctrl_c_exits_130_in_one_line(tmp_path, data_dir):
    out = tmp_path / "run"
    log = tmp_path / "cv.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*CLI, "cv", "--config", str(SMOKE), "--data", str(data_dir), "--out", str(out), "--set", "data.max_images=16"],
            stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        wait_for(lambda: "fold 0: training" in log.read_text(), process, log)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text and "Aborted" not in text
    assert last_line(text) == f"interrupted by SIGINT; finished folds are kept; continue with: hsqformer cv --out {out} --resume"


# ---------------------------------------------------------------------------------------------- files that change


def test_an_image_spoilt_after_the_check_stops_in_one_line_and_keeps_the_finished_fold(tmp_path, monkeypatch):
    rows = image_rows(8)
    images = tmp_path / "imgs"
    images.mkdir()
    for i, (path, *rest) in enumerate(rows):  # copies, so that one can be spoilt
        target = images / f"{i}.png"
        target.write_bytes(Path(path).read_bytes())
        rows[i] = (str(target), *rest)
    manifest = write_manifest(tmp_path / "data.csv", rows)
    out = tmp_path / "run"
    real_train_fold = engine.train_fold
    spoilt: list[str] = []

    def spoil_before_fold_1(k, inputs, fold_dir, train_rows, val_rows, *rest):
        if k == 1:  # after the check and after fold 0, an image that fold 1 validates on is cut short
            victim = inputs.frame["path"].iloc[val_rows[0]]
            truncated_copy(Path(victim), Path(victim))
            spoilt.append(victim)
        return real_train_fold(k, inputs, fold_dir, train_rows, val_rows, *rest)

    monkeypatch.setattr(engine, "train_fold", spoil_before_fold_1)
    tiny = ["--set", "model.name=test_resnet", "--set", "model.kwargs={}", "--set", "model.pretrained=false"]
    code, err = run_cli("cv", "--config", SMOKE, "--data", manifest, "--out", out, *tiny)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    row = [r[0] for r in rows].index(spoilt[0]) + 1
    line = last_line(err)
    assert line.startswith(f"error: unreadable image {spoilt[0]} (row {row} of {manifest}): "), line
    assert line.endswith(f"continue with: hsqformer cv --out {out} --resume")
    assert (out / "fold_0" / "done.json").is_file() and (out / "fold_0" / "model.safetensors").is_file()
    assert not (out / "fold_1" / "done.json").exists()


# ---------------------------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished two-fold run of a tiny timm model (untrained: predict only has to run)."""
    from hsqformer.checkpoint import create_model, save_checkpoint
    from hsqformer.training.config import config_to_dict
    from hsqformer.files import write_json, write_yaml
    from hsqformer.training.transforms import preprocess_config

    out = tmp_path_factory.mktemp("tiny") / "run"
    cfg = load_config(SMOKE, ["model.name=test_resnet", "model.kwargs={}", "model.pretrained=false"])
    write_yaml(out / "config.yaml", config_to_dict(cfg))
    write_json(out / "run.json", {"format": run_folder.RUN_FORMAT, "data": "x", "tests": {}, "classes": ["benign", "malignant"]})
    for k in range(cfg.cv.n_folds):
        torch.manual_seed(k)
        model = create_model("test_resnet", 2)
        meta = {"model_name": "test_resnet", "num_classes": 2, "model_kwargs": {}, "classes": ["benign", "malignant"],
                "positive_class": "malignant", "preprocess": preprocess_config(cfg.augment, model), "fold": k}
        save_checkpoint(out / f"fold_{k}", model, meta)
        write_json(out / f"fold_{k}" / "done.json", {"fold": k})
    return out


def test_predict_reports_a_decompression_bomb_in_one_line_and_skips_bad_files_on_request(tiny_run, tmp_path):
    scans = tmp_path / "scans"
    good = [Path(r[0]) for r in image_rows(1)]
    scans.mkdir()
    for path in good:
        (scans / path.name).write_bytes(path.read_bytes())
    bomb = bomb_png(scans / "bomb.png")
    cut = truncated_copy(good[0], scans / "cut.png")
    out = tmp_path / "preds.csv"
    code, err = run_cli("predict", "--run", tiny_run, scans, "--out", out)
    assert code == 2 and "Traceback" not in err and not out.exists()
    assert last_line(err).startswith(f"error: unreadable image {bomb}: ") and "decompression bomb" in last_line(err)
    assert last_line(err).endswith("(and 1 more); pass --skip-bad to predict the other images")

    code, err = run_cli("predict", "--run", tiny_run, scans, "--out", out, "--skip-bad")
    assert code == 0, err[-2000:]
    assert "skipped 2 unreadable images" in err
    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == 4 and table["image"].tolist() == sorted(str(p) for p in scans.iterdir())
    skipped = table.set_index("image")["skipped"]
    assert skipped[str(bomb)].startswith("unreadable image") and skipped[str(cut)].startswith("unreadable image")
    assert (skipped[[str(scans / p.name) for p in good]] == "").all()
    readable = table[table["skipped"] == ""]
    assert np.allclose(readable[["prob_ensemble_benign", "prob_ensemble_malignant"]].astype(float).sum(axis=1), 1, atol=1e-5)
    assert (table.loc[table["skipped"] != "", "prob_ensemble"] == "").all()


def test_errors_from_data_loader_workers_are_one_line():
    from hsqformer.cli import _one_line

    wrapped = HSQformerError(
        "Caught HSQformerError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nhsqformer.errors.HSQformerError: unreadable image /x/a.png (row 3 of /x/d.csv): cut'
    )
    assert _one_line(wrapped) == "unreadable image /x/a.png (row 3 of /x/d.csv): cut"


def test_signals_become_interrupted_with_the_shell_exit_status():
    from hsqformer.interrupts import Interrupted, exit_on_signals

    before = signal.getsignal(signal.SIGTERM)
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        with pytest.raises(Interrupted) as info, exit_on_signals():
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises at once
        assert info.value.exit_code == code and info.value.name == signal.Signals(signum).name
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_error_raised_while_handling_an_interruption_still_exits_with_the_signal(monkeypatch, capsys):
    """Workers killed with the group fail the loader while the main process unwinds its own SIGTERM."""
    import hsqformer.cli as cli
    from hsqformer.interrupts import Interrupted

    def app() -> None:
        try:
            raise Interrupted(signal.SIGTERM)
        except Interrupted:
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.") from None

    monkeypatch.setattr(cli, "build_app", lambda: app)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 143
    assert capsys.readouterr().err == "interrupted by SIGTERM\n"
    monkeypatch.setattr(cli, "build_app", lambda: lambda: (_ for _ in ()).throw(RuntimeError("a real bug")))
    with pytest.raises(RuntimeError, match="a real bug"):
        cli.main()


def test_loader_workers_killed_by_the_group_signal_count_as_that_signal():
    """When the workers' death is noticed before the main process's own SIGTERM handler runs."""
    from hsqformer.interrupts import interruption_behind

    found = interruption_behind(RuntimeError("DataLoader worker (pid 17908) is killed by signal: Terminated. "))
    assert found is not None and found.exit_code == 143
    assert interruption_behind(RuntimeError("DataLoader worker (pid 1) is killed by signal: Interrupt. ")).exit_code == 130
    assert interruption_behind(RuntimeError("DataLoader worker (pid 1) exited unexpectedly")) is None
    assert interruption_behind(ValueError("killed by signal: Terminated")) is None


def test_the_metrics_log_survives_a_crash_while_its_header_is_rewritten(tmp_path, monkeypatch):
    """Lightning truncates metrics.csv to rewrite its header when a new metric appears; a run killed
    then (CI caught one right after the epoch's checkpoint) lost every earlier row. Ours keeps them."""
    from hsqformer.training.csv_log import DurableCSVLogger

    def two_epochs(logger: DurableCSVLogger) -> Path:
        logger.log_metrics({"val_auc": 0.75, "epoch": 0}, step=1)
        logger.save()
        logger.log_metrics({"train_loss_epoch": 0.5, "epoch": 0}, step=1)  # a new column: the header changes
        logger.save()
        return Path(logger.log_dir) / "metrics.csv"

    rows = pd.read_csv(two_epochs(DurableCSVLogger(tmp_path / "whole", name="logs")))
    assert list(rows["val_auc"].dropna()) == [0.75] and list(rows["train_loss_epoch"].dropna()) == [0.5]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-rewrite")

    monkeypatch.setattr("hsqformer.files.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        two_epochs(DurableCSVLogger(tmp_path / "killed", name="logs"))
    log = tmp_path / "killed" / "logs" / "version_0" / "metrics.csv"
    assert list(pd.read_csv(log)["val_auc"]) == [0.75]
    assert [p.name for p in log.parent.iterdir()] == ["metrics.csv"]
