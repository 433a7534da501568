"""``hsqformer sweep``: grids read and checked, points trained on the same folds, resumed, run in parallel, read as a report.

Training uses a micro recipe (the smoke recipe with ResNet-10t backbones at 32 px, one query stage,
16 images of the embedded sample, 2 folds of 1 epoch): a point takes a few seconds. The report is
tested on synthetic finished runs (run_fixtures.py), whose AUCs are known independently.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from hsqformer.errors import HSQformerError
from hsqformer.hardware import machine_label
from hsqformer.sweep.grid import read_grid
from hsqformer.sweep.report import grid_figures, write_sweep_report
from hsqformer.training.config import load_config
from run_fixtures import synthetic_study
from shared_data import SAMPLE
from test_cli_cv import SMOKE, run_cli

MICRO = {
    "extends": str(SMOKE),
    "data": {"max_images": 16, "verify_images": False},
    "model": {"kwargs": {"backbones": ["resnet10t", "resnet10t"], "pretrained_backbones": False,
                         "num_queries": 8, "embed_dim": 32, "stage_depths": [0, 0, 0, 1]}},
    "augment": {"img_size": 32},
    "trainer": {"progress_bar": False},
}

ATTN_ORDER = {"product": {"model.kwargs.attn_order": ["serial", "parallel"]}}

EXPERTS = {
    "title": "experts x routing",
    "product": {
        "model.kwargs.num_experts": [2, 4],
        "routing": {"top-1": {"model.kwargs.top_k": 1}, "dense": {"model.kwargs.moe_mode": "dense"}},
    },
    "points": {"MLP": {"model.kwargs.moe_mode": "mlp"}},
}


def write_yaml(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_yaml(tmp_path_factory.mktemp("config") / "micro.yaml", MICRO)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread while training the micro recipe: its operations are too small for threads, and on busy cores
    they wait for each other (a micro point measured 23 s with 2 threads, 4 s with one; see conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def test_grid_points_their_names_and_the_base_config(micro: Path, tmp_path: Path) -> None:
    grid = read_grid(write_yaml(tmp_path / "g.yaml", EXPERTS), load_config(micro))
    assert [p.name for p in grid.points] == [
        "num_experts=2, routing=top-1", "num_experts=2, routing=dense",
        "num_experts=4, routing=top-1", "num_experts=4, routing=dense", "MLP",
    ]
    assert [p.slug for p in grid.points][:2] == ["num_experts-2_routing-top-1", "num_experts-2_routing-dense"]
    assert [(a.name, a.labels) for a in grid.axes] == [("num_experts", ("2", "4")), ("routing", ("top-1", "dense"))]
    # hsqformer_small has 4 experts, top-1: the point that spells that out is the base config, trained once
    assert grid.base.name == "num_experts=4, routing=top-1"
    dense = grid.points[3]
    assert dense.settings == {"model.kwargs.num_experts": 4, "model.kwargs.moe_mode": "dense"}
    assert dense.config.model.kwargs["moe_mode"] == "dense" and dense.config.model.kwargs["num_queries"] == 8
    assert [p.name for p in grid.extras()] == ["MLP"]

    ratios = {"product": {"model.kwargs.stage_depths": [[0, 0, 1, 1], [0, 1, 1, 1]]}}
    grid = read_grid(write_yaml(tmp_path / "r.yaml", ratios), load_config(micro))
    assert [p.name for p in grid.points] == ["base", "stage_depths=0:0:1:1", "stage_depths=0:1:1:1"]
    assert grid.base is grid.points[0] and grid.base.settings == {}
    assert grid.axes[0].numbers() is None


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"product": {"optimizer.lrr": [0.1]}}, "unknown config key 'optimizer.lrr'; did you mean 'optimizer.lr'?"),
        ({"points": {"fast": {"optimizer.lr": "fast"}}}, "point 'fast': config key 'optimizer.lr': expected a number"),
        ({"title": "nothing"}, "the grid is empty"),
        ({"product": {"optimizer.lr": []}}, "no values"),
        ({"product": {"cv.seed": [1, 2]}}, "'cv.seed' cannot vary"),
        ({"product": {"routing": [1, 2]}}, "maps labels to settings"),
        ({"points": {"x": {"optimizer.lr": 0.1}, "y": {"optimizer.lr": 0.1}}}, "points 'x' and 'y' have the same config"),
        ({"product": {"model.kwargs.top_k": [9]}}, "point 'top_k=9': model 'hsqformer_small'"),
    ],
)
def test_bad_grids_fail_in_one_line_before_anything_is_written(micro: Path, tmp_path: Path, grid: dict, message: str) -> None:
    out = tmp_path / "sweep"
    code, err = run_cli("sweep", "--config", micro, "--grid", write_yaml(tmp_path / "g.yaml", grid),
                        "--data", SAMPLE, "--out", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], err[-2000:]
    assert not out.exists()


def test_report_reads_the_grid_with_compare(micro: Path, tmp_path: Path) -> None:
    grid = read_grid(write_yaml(tmp_path / "g.yaml", EXPERTS), load_config(micro))
    separations = {p.slug: 0.5 + 0.3 * i for i, p in enumerate(grid.points)}
    synthetic_study(tmp_path / "points", separations, n=120, n_folds=3)
    folders = {p.name: tmp_path / "points" / p.slug for p in grid.points}
    sweep_md, report = write_sweep_report(grid, folders, tmp_path / "report", n_resamples=200)

    table = pd.read_csv(tmp_path / "report" / "sweep_table.csv")
    assert table["point"].tolist() == [p.name for p in grid.points]
    for point, row in zip(grid.points, table.itertuples(), strict=True):
        predictions = pd.read_csv(folders[point.name] / "predictions.csv")
        truth = predictions["label"] == "malignant"
        pooled = predictions[[f"prob_fold{k}" for k in range(3)]].max(axis=1)  # each image's out-of-fold score
        assert row.auc == pytest.approx(roc_auc_score(truth, pooled))
        assert row.reference == point.is_base
        assert np.isnan(row.delong_p) == point.is_base
    assert (table["delong_p_holm"].dropna() >= table["delong_p"].dropna() - 1e-12).all()
    assert report["reference"] == grid.base.name
    text = sweep_md.read_text(encoding="utf-8")
    assert text.count("**(reference)**") == 1 and "Every point is finished" in text
    for name in ("sweep_validation.png", "heatmap_validation.png", "report.md", "roc_validation.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name

    # one numeric setting: lines; named points only: bars; a point not finished is named as left out
    numeric = read_grid(write_yaml(tmp_path / "n.yaml", {"product": {"model.kwargs.num_queries": [4, 8]}}),
                        load_config(micro))
    part = report["cohorts"]["validation"]
    assert [p.name for p in grid_figures(numeric, part, "validation", tmp_path / "figures")] == ["sweep_validation.png"]
    partial = {name: folder for name, folder in folders.items() if name != "MLP"}
    sweep_md, _ = write_sweep_report(grid, partial, tmp_path / "report", unfinished=["MLP"], n_resamples=200)
    assert "Not finished, left out: MLP." in sweep_md.read_text(encoding="utf-8")
    with pytest.raises(HSQformerError, match="reference point .* is not finished"):
        write_sweep_report(grid, {"MLP": folders["MLP"]}, tmp_path / "report")


def test_line_figure_gives_each_series_and_off_grid_point_its_own_colour(
        micro: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fig. 8's figure once drew the MLP's dashed line in the colour of the top-2 series (the base ring took one)."""
    import hsqformer.evaluation.figures as figures

    grid = read_grid(write_yaml(tmp_path / "g.yaml", EXPERTS), load_config(micro))
    synthetic_study(tmp_path / "points", {p.slug: 0.6 for p in grid.points}, n=60, n_folds=2)
    _, report = write_sweep_report(grid, {p.name: tmp_path / "points" / p.slug for p in grid.points},
                                   tmp_path / "report", n_resamples=50)
    drawn = []
    monkeypatch.setattr(figures, "save_png", lambda fig, path: drawn.append(fig) or path)
    grid_figures(grid, report["cohorts"]["validation"], "validation", tmp_path / "figures")
    for ax in drawn[0].axes:
        handles, labels = ax.get_legend_handles_labels()
        assert len(labels) == 3, labels  # two routing series and the MLP
        colours = {matplotlib.colors.to_hex(h.lines[0].get_color() if hasattr(h, "lines") else h.get_color())
                   for h in handles}
        assert len(colours) == 3, labels


def test_report_gives_each_points_training_cost_and_flags_mixed_precision(micro: Path, tmp_path: Path) -> None:
    """The cost table sums the folds' recorded wall times; points trained in other precisions or on other machines
    (a grid split over sessions) are called not like for like; runs without those records say unknown."""
    grid = read_grid(write_yaml(tmp_path / "g.yaml", ATTN_ORDER), load_config(micro))
    synthetic_study(tmp_path / "points", {p.slug: 0.8 for p in grid.points}, n=60, n_folds=2)
    folders = {p.name: tmp_path / "points" / p.slug for p in grid.points}
    serial, parallel = folders["attn_order=serial"], folders["attn_order=parallel"]
    cpu = {"cpu_count": 2, "gpus": [], "system": {"cpu cores": "2", "CPU native bf16": "yes, AMX"}}
    for folder, precision, seconds, resumed in ((serial, "bf16-mixed", (90.0, 150.0), None),
                                                (parallel, "32-true", (60.0, 66.0), 3)):
        (folder / "versions.json").write_text(json.dumps(cpu))
        for k, wall in enumerate(seconds):
            done = {"fold": k, "precision": precision, "wall_seconds": wall, "resumed_from_epoch": resumed if k else None}
            (folder / f"fold_{k}" / "done.json").write_text(json.dumps(done))
    sweep_md, _ = write_sweep_report(grid, folders, tmp_path / "report", n_resamples=200)
    text = sweep_md.read_text(encoding="utf-8")
    machine = "CPU, 2 cores, native bf16: yes, AMX"
    assert f"| attn_order=serial | 2 | 4.0 | 2.0 | bf16-mixed | {machine} |" in text
    assert f"| attn_order=parallel | 2 | 2.1 (1 resumed) | 1.1 | 32-true | {machine} |" in text
    assert f"(precisions: 32-true, bf16-mixed; machines: {machine})" in text
    assert "A fold resumed after an interruption" in text
    table = pd.read_csv(tmp_path / "report" / "sweep_table.csv").set_index("point")
    assert table.loc["attn_order=serial", "train_minutes"] == 4.0
    assert table.loc["attn_order=parallel", "precision"] == "32-true"

    (parallel / "fold_1" / "done.json").write_text(json.dumps({"fold": 1}))  # a record from before the times
    (parallel / "versions.json").unlink()
    (serial / "fold_0" / "done.json").write_text(json.dumps({"fold": 0, "precision": "32-true", "wall_seconds": 90.0}))
    (serial / "fold_1" / "done.json").write_text(json.dumps({"fold": 1, "precision": "32-true", "wall_seconds": 150.0}))
    text = write_sweep_report(grid, folders, tmp_path / "report", n_resamples=200)[0].read_text(encoding="utf-8")
    assert "| attn_order=parallel | 2 |  |  | 32-true | unknown |" in text
    assert f"(precisions: 32-true; machines: {machine}; unknown)" in text

    # a run resumed on another machine: that fold's own record wins over versions.json (where the run started)
    elsewhere = "CPU AMD EPYC, 2 cores, native bf16: yes, AVX-512 BF16"
    (serial / "fold_1" / "done.json").write_text(
        json.dumps({"fold": 1, "precision": "32-true", "wall_seconds": 150.0, "machine": elsewhere}))
    text = write_sweep_report(grid, folders, tmp_path / "report", n_resamples=200)[0].read_text(encoding="utf-8")
    assert f"| attn_order=serial | 2 | 4.0 | 2.0 | 32-true | {elsewhere}; {machine} |" in text
    assert f"(precisions: 32-true; machines: {elsewhere}; {machine}; unknown)" in text


def test_sweep_trains_every_point_once_and_resumes(micro: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid, out = write_yaml(tmp_path / "grid.yaml", ATTN_ORDER), tmp_path / "sweep"
    args = ("sweep", "--config", micro, "--grid", grid, "--data", SAMPLE, "--out", out, "--resamples", "200")
    code, err = run_cli(*args)
    assert code == 0, err[-3000:]
    serial, parallel = out / "points" / "attn_order-serial", out / "points" / "attn_order-parallel"
    assert sorted(p.name for p in (out / "points").iterdir()) == [parallel.name, serial.name]  # serial is the base
    run = json.loads((parallel / "run.json").read_text(encoding="utf-8"))
    assert "--set model.kwargs.attn_order=parallel" in run["command"]
    assert json.loads((parallel / "fold_0" / "done.json").read_text(encoding="utf-8"))["machine"] == machine_label()
    assert yaml.safe_load((parallel / "config.yaml").read_text())["model"]["kwargs"]["attn_order"] == "parallel"
    text = (out / "report" / "sweep.md").read_text(encoding="utf-8")
    assert "| attn_order=serial **(reference)** |" in text and "| attn_order=parallel |" in text

    capsys.readouterr()
    assert run_cli(*args[:-2], "--list")[0] == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == ["0\tdone\tattn_order=serial [reference]\tmodel.kwargs.attn_order=serial",
                      "1\tdone\tattn_order=parallel\tmodel.kwargs.attn_order=parallel"]

    # point 1 as if stopped during its second fold; point 0 is finished and must not be touched
    (parallel / "metrics.json").unlink()
    (parallel / "fold_1" / "done.json").unlink()
    finished = (serial / "metrics.json").stat().st_mtime_ns
    code, err = run_cli(*args)
    assert code == 0, err[-3000:]
    assert "point 0 'attn_order=serial' (1 of 2 selected, 2 in the grid): done earlier, skipped" in err
    assert "point 1 'attn_order=parallel' (2 of 2 selected, 2 in the grid): resuming" in err
    assert "fold 0: done earlier, skipped" in err
    assert (parallel / "metrics.json").is_file() and (serial / "metrics.json").stat().st_mtime_ns == finished

    code, err = run_cli(*args, "--point", "5")
    assert code == 2 and err.strip().splitlines()[-1] == "error: --point 5: the grid has 2 points, 0 to 1 (see --list)"
    code, err = run_cli(*args, "--set", "trainer.epochs=2")
    assert code == 2
    assert "was trained with another config (key 'trainer.epochs' differs)" in err.strip().splitlines()[-1]


def test_a_finished_cv_run_is_taken_as_its_point(micro: Path, tmp_path: Path) -> None:
    """``--reuse``: a cv run of the base config (which leaves attn_order at its default) becomes the serial point
    without training, hard-linked; a rerun accepts it; runs that fit no point, or are unfinished, are refused."""
    base_run, other_run = tmp_path / "base_run", tmp_path / "other_run"
    assert run_cli("cv", "--config", micro, "--data", SAMPLE, "--out", base_run)[0] == 0
    grid, out = write_yaml(tmp_path / "grid.yaml", ATTN_ORDER), tmp_path / "sweep"
    args = ("sweep", "--config", micro, "--grid", grid, "--data", SAMPLE, "--out", out, "--resamples", "200")

    code, err = run_cli(*args, "--reuse", base_run)
    assert code == 0, err[-3000:]
    serial = out / "points" / "attn_order-serial"
    assert f"point 'attn_order=serial': finished run {base_run} taken as it is (--reuse)" in err
    assert "point 0 'attn_order=serial' (1 of 2 selected, 2 in the grid): done earlier, skipped" in err
    reused = serial / "predictions.csv"
    assert reused.stat().st_ino == (base_run / "predictions.csv").stat().st_ino
    assert not (out / "points" / "attn_order-serial.partial").exists()
    assert (out / "points" / "attn_order-parallel" / "metrics.json").is_file()
    assert "| attn_order=serial **(reference)** |" in (out / "report" / "sweep.md").read_text(encoding="utf-8")

    code, err = run_cli(*args, "--reuse", base_run)  # everything done: the finished point is not replaced
    assert code == 0, err[-3000:]
    assert "taken as it is" not in err and reused.stat().st_ino == (base_run / "predictions.csv").stat().st_ino

    assert run_cli("cv", "--config", micro, "--set", "trainer.epochs=2", "--data", SAMPLE, "--out", other_run)[0] == 0
    code, err = run_cli(*args, "--reuse", other_run)
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"error: --reuse {other_run}: its config is no point of the grid "
                                            "(from the reference config, key 'trainer.epochs' differs)")
    (other_run / "metrics.json").unlink()
    code, err = run_cli(*args, "--reuse", other_run)
    assert code == 2 and f"--reuse {other_run}: not a finished cv run (no metrics.json)" in err.strip().splitlines()[-1]
    code, err = run_cli(*args, "--reuse", base_run, "--report-only")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --reuse takes runs in when the sweep starts")


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_parallel_sweep_stops_its_children_on_sigterm(micro: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Points run as child processes (--jobs 2); SIGTERM to the sweep stops them all and leaves resumable points
    (resuming itself is tested above)."""
    grid, out = write_yaml(tmp_path / "grid.yaml", ATTN_ORDER), tmp_path / "sweep"
    args = ["sweep", "--config", str(micro), "--grid", str(grid), "--data", str(SAMPLE), "--out", str(out)]
    parent = subprocess.Popen([sys.executable, "-c", "from hsqformer.cli import main; main()", *args, "--jobs", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 180
    while not list(out.glob("points/*/run.json")) and parent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    parent.send_signal(signal.SIGTERM)
    _, err = parent.communicate(timeout=180)
    assert parent.returncode == 143, err[-3000:]
    assert "stopping 2 running child processes" in err
    assert err.strip().splitlines()[-1] == (
        "interrupted by SIGTERM; finished points and folds are kept; run the same command again to continue"
    )
    assert _processes_naming(str(out)) == []
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["attn_order-parallel.log", "attn_order-serial.log"]

    capsys.readouterr()
    assert run_cli(*args, "--list")[0] == 0
    statuses = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]
    assert "started" in statuses and "done" not in statuses
