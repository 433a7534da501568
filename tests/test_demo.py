"""``hsqformer demo`` on the embedded sample: audit, two cross-validations and their comparison, in one folder."""

from __future__ import annotations

import json

import pytest
from test_cli_cv import last_line, run_cli, snapshot

from hsqformer import sample_data

#: Even tinier than the demo's own configs: 2 folds of 1 epoch on 40 of the 100 images.
QUICK = ["--set", "trainer.epochs=1", "--set", "cv.n_folds=2", "--set", "data.max_images=40",
         "--set", "trainer.progress_bar=false"]


def test_the_sample_ships_with_its_manifest_and_attribution() -> None:
    folder = sample_data.path()
    lines = sample_data.manifest().read_text().splitlines()
    assert lines[0] == "path,label,patient_id,center" and len(lines) == 101
    assert all((folder / line.split(",")[0]).is_file() for line in lines[1:])
    assert sum(line.split(",")[1] == "malignant" for line in lines[1:]) == 50
    attribution = (folder / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in attribution and "Al-Dhabyani" in attribution and "downscaled" in attribution
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 3e6


@pytest.mark.slow
def test_demo_writes_a_report_comparing_both_models(tmp_path) -> None:
    out = tmp_path / "demo"
    code, err = run_cli("demo", "--out", out, *QUICK)
    assert code == 0, err[-3000:]
    record = json.loads((out / "demo.json").read_text())
    assert record["finished"] and set(record["seconds"]) == {"audit", "hsqformer", "lite0", "compare", "total"}
    assert record["report"] == str(out / "compare" / "report.md")
    assert (out / "audit.md").read_text().startswith("# Data audit")
    report = json.loads((out / "compare" / "report.json").read_text())
    validation = report["cohorts"]["validation"]
    assert set(validation["models"]) == {"HSQformer-S (tiny)", "EfficientNet-Lite0", "shortcut floor"}
    assert validation["n_images"] == 40 and report["reference"] == "HSQformer-S (tiny)"
    assert [run["model"] for run in report["runs"][:2]] == ["hsqformer_small", "tf_efficientnet_lite0"]
    markdown = (out / "compare" / "report.md").read_text()
    assert "EfficientNet-Lite0" in markdown and (out / "compare" / "roc_validation.png").is_file()

    before = snapshot(out)  # an existing --out is never touched without --overwrite
    code, err = run_cli("demo", "--out", out, *QUICK)
    assert code == 2 and last_line(err) == f"error: {out} already exists; pass --overwrite to replace it"
    assert snapshot(out) == before


def test_demo_never_deletes_a_folder_it_did_not_make(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    code, err = run_cli("demo", "--out", tmp_path, "--overwrite")
    assert code == 2 and "does not hold an earlier demo" in last_line(err)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    code, err = run_cli("demo", "--out", tmp_path / "new", "--set", "trainer.epoch=1")
    assert code == 2 and "unknown config key 'trainer.epoch'" in last_line(err)
    assert not (tmp_path / "new").exists()
