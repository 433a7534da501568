"""The dataset audit: counts, duplicates, shared patients and the shortcut floor.

liver-sysu's own audit needs the real data; the rest runs on the embedded BUSI sample."""

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

from shared_data import DATA, SAMPLE, requires_shared_data, sample_images

from hsqformer.errors import HSQformerError
from hsqformer.data.audit import run_audit

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


def images(label: str, start: int, n: int) -> list[Path]:
    """Distinct images of the embedded sample (its stems, e.g. benign_003, serve as patient ids)."""
    return sample_images(label, n, start)


@requires_shared_data
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
    benign, malignant = images("benign", 0, 8), images("malignant", 0, 8)
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
    three_classes = images("benign", 0, 9) + images("malignant", 0, 9)
    three = make_set(tmp_path / "three", [(p, ("a", "b", "c")[i % 3], p.stem) for i, p in enumerate(three_classes)])
    report = run_audit([three], n_folds=2, progress=False)
    assert report.shortcut_auc.metric == "one-vs-rest macro AUC" and 0 <= report.shortcut_auc.mean <= 1
    small = make_set(tmp_path / "small", [(p, "benign", p.stem) for p in images("benign", 0, 2)]
                     + [(p, "malignant", p.stem) for p in images("malignant", 0, 2)])
    report = run_audit([small], progress=False)
    assert report.shortcut_auc is None and "fewer than n_folds=5" in report.sets[0].shortcut_note
    assert "not computed" in report.to_markdown()
    with pytest.raises(HSQformerError, match="positive class 'cyst'"):
        run_audit([small], n_folds=2, positive_class="cyst", progress=False)


def test_cli_audit_writes_reports(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(HSQFORMER), "audit", str(SAMPLE), "--positive-class", "malignant",
         "--out", str(tmp_path / "audit.md"), "--json", str(tmp_path / "audit.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "audit.json").read_text())
    (audit,) = report["sets"]
    assert audit["n_images"] == 100 and audit["counts"] == {"benign": {"BUSI": 50}, "malignant": {"BUSI": 50}}
    floor = audit["floor"]
    assert 0 <= floor["mean"] <= 1 and floor["metric"] == "AUC (malignant vs rest)" and not floor["patient_grouped"]
    assert f"{floor['mean']:.3f}" in result.stdout
    assert "warning: " in result.stderr and "no patient_id" in result.stderr  # BUSI has no patient ids
    assert (tmp_path / "audit.md").read_text().strip() == result.stdout.strip()
