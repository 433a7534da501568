"""The dataset audit: counts, duplicates, shared patients and the shortcut floor."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hsqformer.errors import HSQformerError
from hsqformer.evaluation.audit import run_audit

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LIVER = DATA / "liver-sysu"
HSQFORMER = Path(sys.executable).with_name("hsqformer")


def make_set(folder: Path, images: list[tuple[Path, str, str]]) -> Path:
    """Copy ``(source image, label, patient id)`` into ``folder/label/`` with a manifest."""
    rows = []
    for source, label, patient in images:
        (folder / label).mkdir(parents=True, exist_ok=True)
        target = folder / label / f"{patient}{source.suffix}"
        shutil.copy(source, target)
        rows.append((f"{label}/{target.name}", label, patient, folder.name))
    pd.DataFrame(rows, columns=["path", "label", "patient_id", "center"]).to_csv(folder / "manifest.csv", index=False)
    return folder


def liver(label: str, start: int, n: int) -> list[Path]:
    manifest = pd.read_csv(LIVER / "manifest.csv")
    return [LIVER / p for p in manifest.loc[manifest["label"] == label, "path"].iloc[start:start + n]]


def test_liver_sysu_audit_shows_the_shortcut_floor() -> None:
    raw = pd.read_csv(LIVER / "manifest.csv")
    report = run_audit([LIVER], progress=False)
    (audit,) = report.sets
    assert audit.n_images == len(raw) and audit.n_patients == raw["patient_id"].nunique()
    assert audit.counts == {
        label: {center: int(n) for center, n in group["center"].value_counts().items()}
        for label, group in raw.groupby("label")
    }
    assert report.duplicates == [] and report.shared_patients == []
    floor = report.shortcut_auc
    assert floor is audit.floor and floor.patient_grouped and floor.n_folds == 5
    assert 0.7 < floor.mean < 0.9, floor
    assert floor.mean == pytest.approx(np.mean(floor.fold_aucs))
    assert floor.std == pytest.approx(np.std(floor.fold_aucs, ddof=1))  # same convention as the model summaries
    size_only = next(r for r in audit.shortcut if r.features == "width, height")
    assert size_only.mean > 0.65  # the known size confound of this set
    markdown = report.to_markdown()
    assert f"{floor.mean:.3f} ± {floor.std:.3f}" in markdown and "Shortcut floor" in markdown


def test_duplicates_and_shared_patients_across_sets(tmp_path: Path) -> None:
    benign, malignant = liver("benign", 0, 8), liver("malignant", 0, 8)
    first = make_set(
        tmp_path / "first",
        [(p, "benign", p.stem) for p in benign[:5]] + [(p, "malignant", p.stem) for p in malignant[:5]]
        + [(benign[0], "malignant", "copy_of_B")],
    )
    recoded = tmp_path / "recoded.png"
    Image.open(malignant[1]).save(recoded, compress_level=1)
    assert recoded.read_bytes() != malignant[1].read_bytes()
    second = make_set(
        tmp_path / "second",
        [(p, "benign", p.stem) for p in benign[5:8]] + [(p, "malignant", p.stem) for p in malignant[5:8]]
        + [(recoded, "malignant", "recoded"), (benign[2], "benign", malignant[3].stem)],
    )
    report = run_audit([first, second], n_folds=2, progress=False)

    groups = {frozenset((m["set"], Path(m["path"]).name) for m in g.members): g for g in report.duplicates}
    within = frozenset({("first", f"{benign[0].stem}.png"), ("first", "copy_of_B.png")})
    across = frozenset({("first", f"{malignant[1].stem}.png"), ("second", "recoded.png")})
    across_shared = frozenset({("first", f"{benign[2].stem}.png"), ("second", f"{malignant[3].stem}.png")})
    assert set(groups) == {within, across, across_shared}
    assert not groups[within].across_sets and groups[within].conflicting_labels
    assert groups[across].across_sets and not groups[across].conflicting_labels

    assert [(s.set_a, s.set_b, s.patient_ids) for s in report.shared_patients] == [
        ("first", "second", [malignant[3].stem])
    ]
    markdown = report.to_markdown()
    assert "conflicting labels" in markdown and "copy_of_B.png" in markdown and malignant[3].stem in markdown


def test_three_classes_and_too_few_patients(tmp_path: Path) -> None:
    images = liver("benign", 0, 9) + liver("malignant", 0, 9)
    three = make_set(tmp_path / "three", [(p, ("a", "b", "c")[i % 3], p.stem) for i, p in enumerate(images)])
    report = run_audit([three], n_folds=2, progress=False)
    assert report.shortcut_auc.metric == "one-vs-rest macro AUC" and 0 <= report.shortcut_auc.mean <= 1
    small = make_set(tmp_path / "small", [(p, "benign", p.stem) for p in liver("benign", 0, 2)]
                     + [(p, "malignant", p.stem) for p in liver("malignant", 0, 2)])
    report = run_audit([small], progress=False)
    assert report.shortcut_auc is None and "fewer than n_folds=5" in report.sets[0].shortcut_note
    assert "not computed" in report.to_markdown()
    with pytest.raises(HSQformerError, match="positive class 'cyst'"):
        run_audit([small], n_folds=2, positive_class="cyst", progress=False)


def test_cli_audit_on_liver_sysu_writes_reports(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(HSQFORMER), "audit", str(LIVER), "--positive-class", "malignant",
         "--out", str(tmp_path / "audit.md"), "--json", str(tmp_path / "audit.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "audit.json").read_text())
    floor = report["sets"][0]["floor"]
    assert 0.7 < floor["mean"] < 0.9 and floor["metric"] == "AUC (malignant vs rest)"
    assert f"{floor['mean']:.3f}" in result.stdout
    assert (tmp_path / "audit.md").read_text().strip() == result.stdout.strip()
