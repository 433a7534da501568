"""Dataset reading, input checks, image decoding and patient-level splits: on the real sets where a test is about
them (skipped without ../shared/data), on the embedded BUSI sample everywhere else."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hsqformer.data import (
    UltrasoundDataset,
    check_no_leakage,
    class_names,
    load_dataset,
    load_image,
    patient_folds,
    save_folds,
)
from hsqformer.errors import HSQformerError
from shared_data import DATA, SAMPLE, requires_shared_data, sample_images

LIVER = DATA / "liver-sysu"
BUSI = DATA / "busi"
HSQFORMER = Path(sys.executable).with_name("hsqformer")


def write_manifest(folder: Path, rows: list[tuple[str, str, str, str]], name: str = "data.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    pd.DataFrame(rows, columns=["path", "label", "patient_id", "center"]).to_csv(path, index=False)
    return path


@pytest.fixture
def small_set(tmp_path: Path) -> Path:
    """A CSV manifest over 4 benign and 4 malignant images of the embedded sample, paths absolute."""
    rows = [(str(p), label, p.stem, "BUSI") for label in ("benign", "malignant") for p in sample_images(label, 4)]
    return write_manifest(tmp_path / "set", rows)


def one_line_error(call) -> str:
    with pytest.raises(HSQformerError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


@requires_shared_data
def test_liver_sysu_loads_with_patient_ids() -> None:
    raw = pd.read_csv(LIVER / "manifest.csv", dtype=str)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = load_dataset(LIVER)
    assert list(frame.columns) == ["path", "label", "patient_id", "center"]
    assert len(frame) == len(raw)
    assert frame["label"].value_counts().to_dict() == raw["label"].value_counts().to_dict()
    assert (frame["patient_id"] != "").all()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in frame["path"])
    assert list(frame["patient_id"]) == list(raw["patient_id"])
    assert class_names(frame) == ["benign", "malignant"]


@requires_shared_data
def test_busi_without_patient_ids_warns_image_level() -> None:
    with pytest.warns(UserWarning, match="no patient_id.*image-level"):
        frame = load_dataset(BUSI, classes=["normal", "benign", "malignant"])
    assert (frame["patient_id"] == "").all()
    assert set(frame["label"]) == {"benign", "malignant", "normal"}
    assert any(" (" in Path(p).name for p in frame["path"])
    assert class_names(frame, ["normal", "benign", "malignant"]) == ["normal", "benign", "malignant"]


def test_folder_per_class_without_manifest(tmp_path: Path) -> None:
    for label in ("benign", "malignant"):
        (tmp_path / label / "nested").mkdir(parents=True)
        for i, source in enumerate(sample_images(label, 3)):
            target = tmp_path / label / ("nested" if i == 0 else "") / source.name
            shutil.copy(source, target)
        (tmp_path / label / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="image-level"):
        frame = load_dataset(tmp_path)
    assert frame["label"].tolist() == ["benign"] * 3 + ["malignant"] * 3
    assert (frame["patient_id"] == "").all()
    assert sum("nested" in p for p in frame["path"]) == 2


def test_relative_paths_resolve_against_the_manifest(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    rows = []
    for label in ("benign", "malignant"):
        source = sample_images(label, 1)[0]
        shutil.copy(source, images / source.name)
        rows.append((f"imgs/{source.name}", label, source.stem, "c"))
    frame = load_dataset(write_manifest(tmp_path, rows))
    assert frame["path"].tolist() == [str(images / r[0].split("/")[1]) for r in rows]


def test_missing_image_names_the_row(small_set: Path) -> None:
    manifest = pd.read_csv(small_set, dtype=str)
    manifest.loc[2, "path"] = "gone/B_999.png"
    manifest.to_csv(small_set, index=False)
    message = one_line_error(lambda: load_dataset(small_set))
    assert "image not found" in message and "B_999.png" in message and f"row 3 of {small_set}" in message


def test_unreadable_image_names_the_file(small_set: Path) -> None:
    broken = small_set.parent / "broken.png"
    broken.write_bytes(b"this is not a PNG file")
    manifest = pd.read_csv(small_set, dtype=str)
    manifest.loc[5, "path"] = "broken.png"
    manifest.to_csv(small_set, index=False)
    message = one_line_error(lambda: load_dataset(small_set))
    assert "unreadable image" in message and str(broken) in message and "row 6" in message


def test_unknown_label_names_the_row(small_set: Path) -> None:
    manifest = pd.read_csv(small_set, dtype=str)
    manifest.loc[6, "label"] = "cyst"
    manifest.to_csv(small_set, index=False)
    message = one_line_error(lambda: load_dataset(small_set, classes=["benign", "malignant"]))
    assert "unknown label 'cyst'" in message and f"row 7 of {small_set}" in message


def test_missing_column_names_the_column(small_set: Path) -> None:
    pd.read_csv(small_set).drop(columns="patient_id").to_csv(small_set, index=False)
    message = one_line_error(lambda: load_dataset(small_set))
    assert "no column 'patient_id'" in message and str(small_set) in message


def test_empty_class_is_an_error(small_set: Path, tmp_path: Path) -> None:
    message = one_line_error(lambda: load_dataset(small_set, classes=["benign", "malignant", "normal"]))
    assert "empty class 'normal'" in message and str(small_set) in message
    (tmp_path / "folders" / "benign").mkdir(parents=True)
    (tmp_path / "folders" / "malignant").mkdir()
    shutil.copy(sample_images("benign", 1)[0], tmp_path / "folders" / "benign")
    message = one_line_error(lambda: load_dataset(tmp_path / "folders"))
    assert "empty class 'malignant'" in message and str(tmp_path / "folders" / "malignant") in message


def test_image_listed_twice_names_both_rows(small_set: Path) -> None:
    manifest = pd.read_csv(small_set, dtype=str)
    manifest.loc[7, "path"] = manifest.loc[1, "path"]
    manifest.to_csv(small_set, index=False)
    message = one_line_error(lambda: load_dataset(small_set))
    assert "listed twice" in message and manifest.loc[1, "path"] in message
    assert "row 2 of" in message and "row 8 of" in message


def test_missing_dataset_and_single_class(small_set: Path, tmp_path: Path) -> None:
    assert str(tmp_path / "nope") in one_line_error(lambda: load_dataset(tmp_path / "nope"))
    manifest = pd.read_csv(small_set, dtype=str)
    manifest["label"] = "benign"
    manifest.to_csv(small_set, index=False)
    assert "at least two classes" in one_line_error(lambda: load_dataset(small_set))


@pytest.mark.parametrize("breakage", ["missing_column", "missing_image"])
def test_cli_reports_bad_input_in_one_line(small_set: Path, breakage: str) -> None:
    manifest = pd.read_csv(small_set, dtype=str)
    if breakage == "missing_column":
        manifest = manifest.drop(columns="label")
    else:
        manifest.loc[0, "path"] = "missing.png"
    manifest.to_csv(small_set, index=False)
    result = subprocess.run([str(HSQFORMER), "audit", str(small_set)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert (str(small_set) if breakage == "missing_column" else "missing.png") in lines[0]


def test_image_formats_load_as_rgb8(tmp_path: Path) -> None:
    original = Image.open(sample_images("malignant", 1)[0]).convert("RGB")
    rgb = np.asarray(original)
    grey = np.asarray(original.convert("L"))
    assert grey.max() >= 128  # so the 16-bit copy uses the top bit and is read as 16-bit

    def loaded(image: Image.Image, name: str, **save_args) -> np.ndarray:
        image.save(tmp_path / name, **save_args)
        result = load_image(tmp_path / name)
        assert result.mode == "RGB" and result.size == original.size
        return np.asarray(result).astype(np.int64)

    def as_grey(pixels: np.ndarray) -> np.ndarray:
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
        return pixels[..., 0]

    assert (as_grey(loaded(Image.fromarray(grey), "grey.png")) == grey).all()

    alpha = np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None, :].repeat(rgb.shape[0], axis=0)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    assert (loaded(rgba, "rgba.png") == rgb).all()

    deep = Image.fromarray(grey.astype(np.uint16) * 257)
    deep.save(tmp_path / "probe16.png")
    assert Image.open(tmp_path / "probe16.png").mode.startswith("I")
    assert np.abs(as_grey(loaded(deep, "deep16.png")) - grey).max() <= 1

    twelve = Image.fromarray(np.round(grey.astype(np.float64) * 4095 / 255).astype(np.uint16))
    assert np.abs(as_grey(loaded(twelve, "deep12.png")) - grey).max() <= 1

    palette = Image.new("P", original.size)
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    palette.putdata(grey.flatten().tolist())
    assert (as_grey(loaded(palette, "palette.png")) == grey).all()
    quantized = original.quantize(64)
    assert (loaded(quantized, "quantized.png") == np.asarray(quantized.convert("RGB"))).all()

    jpeg = as_grey(loaded(Image.fromarray(grey), "grey.jpg", quality=95))
    assert np.abs(jpeg - grey).mean() < 2


def test_ultrasound_dataset_items(small_set: Path) -> None:
    frame = load_dataset(small_set)
    names = ["malignant", "benign"]
    dataset = UltrasoundDataset(frame, names, transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    assert len(dataset) == len(frame)
    image, target = dataset[0]
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert target == 1 and dataset[len(dataset) - 1][1] == 0
    assert dataset.targets.tolist() == [names.index(label) for label in frame["label"]]
    with pytest.raises(HSQformerError, match="unknown label 'benign'"):
        UltrasoundDataset(frame, ["malignant", "other"])


@requires_shared_data
def test_patient_folds_on_liver_sysu_are_stratified_and_seeded() -> None:
    frame = load_dataset(LIVER, verify_images=False)
    folds = patient_folds(frame, n_folds=5, seed=0)
    check_no_leakage(frame, folds)
    assert len(folds) == 5
    malignant = (frame["label"] == "malignant").to_numpy()
    for train, val in folds:
        assert abs(malignant[val].mean() - malignant.mean()) < 0.05
        assert len(train) + len(val) == len(frame)
    again = patient_folds(frame, n_folds=5, seed=0)
    other = patient_folds(frame, n_folds=5, seed=1)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again))
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_patient_folds_keep_patients_together_and_leaks_are_caught() -> None:
    rng = np.random.default_rng(0)
    patients = np.repeat([f"P{i}" for i in range(30)], rng.integers(1, 5, size=30))
    labels = np.where(np.char.lstrip(patients, "P").astype(int) % 3 == 0, "malignant", "benign")
    frame = pd.DataFrame({"path": [f"/x/{i}.png" for i in range(len(patients))], "label": labels,
                          "patient_id": patients, "center": ""})
    folds = patient_folds(frame, n_folds=3, seed=7)
    check_no_leakage(frame, folds)
    for _, val in folds:
        in_val = set(frame["patient_id"].iloc[val])
        assert frame.index[frame["patient_id"].isin(in_val)].isin(val).all()

    patient = frame["patient_id"][frame["patient_id"].duplicated()].iloc[0]
    first, second = frame.index[frame["patient_id"] == patient][:2]
    k = next(k for k, (_, val) in enumerate(folds) if first in val)
    leaky = list(folds)
    train, val = folds[k]
    leaky[k] = (np.append(train, second), val[val != second])
    message = one_line_error(lambda: check_no_leakage(frame, leaky))
    assert f"fold {k}: patient '{patient}' is in train and validation" in message
    dropped = [(t, v[1:]) if k == 0 else (t, v) for k, (t, v) in enumerate(folds)]
    assert "not a partition" in one_line_error(lambda: check_no_leakage(frame, dropped))
    assert "fewer than n_folds=40" in one_line_error(lambda: patient_folds(frame, n_folds=40))


@requires_shared_data
def test_save_folds_writes_once(tmp_path: Path) -> None:
    frame = load_dataset(LIVER, verify_images=False)
    folds = patient_folds(frame, n_folds=5, seed=0)
    path = save_folds(frame, folds, tmp_path / "run" / "splits.csv")
    table = pd.read_csv(path, dtype={"patient_id": str})
    assert table["fold"].value_counts().sort_index().tolist() == [len(v) for _, v in folds]
    assert table.groupby("patient_id")["fold"].nunique().max() == 1
    assert "already exists" in one_line_error(lambda: save_folds(frame, folds, path))


def test_busi_folds_warn_image_level() -> None:
    with pytest.warns(UserWarning, match="no patient_id.*image-level"):
        frame = load_dataset(SAMPLE, verify_images=False)  # the embedded BUSI sample: no patient ids either
    with pytest.warns(UserWarning, match="image-level"):
        folds = patient_folds(frame, n_folds=5, seed=0)
    check_no_leakage(frame, folds)


class _InheritanceProbe(torch.utils.data.Dataset):
    """Yields 1 where the worker sees a marker that the parent set at run time, i.e. inherited its memory."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        import hsqformer.data.dataset as module

        return int(hasattr(module, "_parent_marker"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="loader workers start from a forkserver on Linux only")
def test_loader_workers_do_not_inherit_the_trainers_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forked worker pins a snapshot of the trainer's heap (gigabytes after a fold); forkserver workers see none of it."""
    import hsqformer.data.dataset as module
    from hsqformer.data.dataset import worker_context

    monkeypatch.setattr(module, "_parent_marker", object(), raising=False)
    forked = torch.utils.data.DataLoader(_InheritanceProbe(), batch_size=1, num_workers=1)
    assert [int(b) for b in forked] == [1, 1]  # PyTorch's default fork: the probe sees the parent's state
    clean = torch.utils.data.DataLoader(_InheritanceProbe(), batch_size=1, num_workers=1,
                                        multiprocessing_context=worker_context(1))
    assert [int(b) for b in clean] == [0, 0]
    assert worker_context(0) is None
