"""Running a grid: every point a ``cv`` run on the same folds, resumable, in this process or as parallel children.

The sweep folder::

    OUT/sweep.json          what the sweep is: base config, grid, data, points (rewritten at each start)
    OUT/points/<point>/     one hsqformer cv run folder per point
    OUT/logs/<point>.log    output of a point run as a child process (--jobs, --devices)
    OUT/locks/<point>.lock  held while a process trains that point
    OUT/report/             the grid read by compare: sweep.md with its figures, report.md (hsqformer compare)

A finished point (``metrics.json``) is skipped, a started one is resumed (``cv --resume``: done
folds are skipped, the interrupted fold continues from its last checkpoint). A point folder
that was trained with another config or data than the point now has is an error, not a silent
mix; configs are compared with the model's defaults filled in, so a run that leaves a default
out is the same run as a point that spells it. A finished ``cv`` run trained elsewhere on the same
data (typically the base config, the dearest point) is taken as the point whose config it holds
with ``--reuse``: its files are hard-linked (copied across file systems) into that point's folder.
Two processes never train the same point at once: each holds the point's lock file.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hsqformer.errors import HSQformerError
from hsqformer.sweep.grid import Grid, Point, read_grid
from hsqformer.sweep.processes import Job, log_tail, run_jobs
from hsqformer.sweep.settings import check_models, comparable, drop_weights, set_arguments
from hsqformer.training.config import first_difference, load_config
from hsqformer.files import write_json
from hsqformer.training.run_folder import METRICS_FILE, RUN_FILE, read_run, read_saved_config

SWEEP_FORMAT = "hsqformer-sweep/1"
SWEEP_FILE = "sweep.json"
POINTS_DIR = "points"
LOGS_DIR = "logs"
LOCKS_DIR = "locks"
REPORT_DIR = "report"


@dataclass
class Sweep:
    """A checked sweep: the grid against its base config, the data and the sweep folder."""

    config: Path
    overrides: list[str]
    grid: Grid
    data: str | None
    tests: dict[str, str]
    out: Path

    def point_dir(self, point: Point) -> Path:
        return self.out / POINTS_DIR / point.slug

    def status(self, point: Point) -> str:
        """``done`` (finished), ``started`` (resumable) or ``pending``."""
        folder = self.point_dir(point)
        if (folder / METRICS_FILE).is_file():
            return "done"
        return "started" if (folder / RUN_FILE).is_file() else "pending"

    def cv_command(self, point: Point) -> str:
        """The ``hsqformer cv`` command that trains ``point`` alone (recorded in its run.json)."""
        args = ["hsqformer", "cv", "--config", str(self.config)]
        args += [item for override in self.overrides for item in ("--set", override)]
        args += set_arguments(point.settings)
        args += ["--data", str(self.data)]
        args += [item for name, source in self.tests.items() for item in ("--test", f"{name}={source}")]
        return shlex.join([*args, "--out", str(self.point_dir(point))])


def say(message: str) -> None:
    """A progress line on stderr."""
    print(f"[hsqformer sweep] {message}", file=sys.stderr, flush=True)


def open_sweep(
    config: Path, overrides: Sequence[str], grid_path: Path, data: str | None, tests: dict[str, str], out: Path
) -> Sweep:
    """Read the base config and the grid, and check the sweep folder (nothing is written yet)."""
    base = load_config(config, overrides)
    grid = read_grid(grid_path, base)
    if out.exists() and not out.is_dir():
        raise HSQformerError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / SWEEP_FILE).is_file():
        raise HSQformerError(f"--out {out} is not empty and holds no {SWEEP_FILE}: not a sweep folder; choose another")
    return Sweep(config, list(overrides), grid, data, dict(tests), out)


def check_points(sweep: Sweep, indices: Sequence[int], reuse: Sequence[Path] = ()) -> list[tuple[Path, Point]]:
    """Everything that can fail before training: the selected points' models, the data, the point folders and
    the ``--reuse`` runs; returns each reused run with the point it stands for (see ``reuse_runs``).

    The data and test cohorts are read and every image decoded once (``prepare_inputs`` of the base
    config); each started or finished point folder must hold a run of that point's config and data,
    and each reused run a finished run of some point's config on the same data.
    """
    from hsqformer.training.engine import prepare_inputs

    if sweep.data is None:
        raise HSQformerError("sweep needs --data to train (only --list and --report-only go without)")
    points = [sweep.grid.points[i] for i in indices]
    check_models((f"grid {sweep.grid.path}, point '{p.name}'", p.config) for p in points)
    inputs = prepare_inputs(sweep.grid.base.config, sweep.data, sweep.tests)
    sources = (inputs.data_source, inputs.test_sources)
    for point in points:
        folder = sweep.point_dir(point)
        if not (folder / RUN_FILE).is_file():
            continue
        differs = first_difference(comparable(read_saved_config(folder)), comparable(point.config))
        if differs:
            raise HSQformerError(
                f"point '{point.name}': {folder} was trained with another config (key '{differs}' differs); "
                "delete that folder to retrain it, or use another --out"
            )
        if _run_sources(folder) != sources:
            raise HSQformerError(
                f"point '{point.name}': {folder} was trained on other data or test cohorts "
                f"({read_run(folder).get('data')}); use another --out"
            )
    return _match_reused(sweep, reuse, sources)


def _run_sources(folder: Path) -> tuple[object, dict[str, str]]:
    run = read_run(folder)
    return run.get("data"), dict(run.get("tests", {}))


def _match_reused(
    sweep: Sweep, runs: Sequence[Path], sources: tuple[str, dict[str, str]]
) -> list[tuple[Path, Point]]:
    """The grid point each ``--reuse`` run stands for; runs whose point is finished already are left out."""
    matched: dict[str, Path] = {}
    pairs = []
    for run in runs:
        where = f"--reuse {run}"
        if not (run / METRICS_FILE).is_file():
            read_run(run)  # one line if it is no run folder at all
            raise HSQformerError(f"{where}: not a finished cv run (no {METRICS_FILE}); finish it with "
                                 f"'hsqformer cv --resume --out {run}' first")
        saved = comparable(read_saved_config(run))
        point = next((p for p in sweep.grid.points if first_difference(saved, comparable(p.config)) is None), None)
        if point is None:
            differs = first_difference(saved, comparable(sweep.grid.base.config))
            raise HSQformerError(f"{where}: its config is no point of the grid (from the reference config, key "
                                 f"'{differs}' differs)")
        if _run_sources(run) != sources:
            raise HSQformerError(f"{where}: trained on other data or test cohorts ({read_run(run).get('data')}) "
                                 f"than this sweep ({sources[0]})")
        if point.slug in matched:
            raise HSQformerError(f"{where}: point '{point.name}' is already taken from --reuse {matched[point.slug]}")
        matched[point.slug] = run
        status = sweep.status(point)
        if status == "started":
            raise HSQformerError(f"{where}: point '{point.name}' holds a started run in {sweep.point_dir(point)}; "
                                 "delete that folder to take the finished run instead")
        if status == "pending":
            pairs.append((run, point))
    return pairs


def reuse_runs(sweep: Sweep, pairs: Sequence[tuple[Path, Point]]) -> None:
    """Put each finished run into its point's folder (hard links, copies across file systems), whole or not at all."""
    for run, point in pairs:
        folder = sweep.point_dir(point)
        partial = folder.with_name(f"{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(run, partial, copy_function=_link_or_copy)
        partial.rename(folder)
        say(f"point '{point.name}': finished run {run} taken as it is (--reuse)")


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def write_sweep_file(sweep: Sweep) -> None:
    """Record what the sweep is (rewritten at each start: a grown grid adds points)."""
    write_json(
        sweep.out / SWEEP_FILE,
        {
            "format": SWEEP_FORMAT,
            "config": str(sweep.config),
            "overrides": sweep.overrides,
            "grid": str(sweep.grid.path),
            "grid_content": sweep.grid.raw,
            "data": str(Path(sweep.data).resolve()) if sweep.data else None,
            "tests": {name: str(Path(source).resolve()) for name, source in sweep.tests.items()},
            "points": [
                {"index": i, "name": p.name, "folder": f"{POINTS_DIR}/{p.slug}", "settings": p.settings,
                 "base": p.is_base}
                for i, p in enumerate(sweep.grid.points)
            ],
        },
    )


def list_points(sweep: Sweep) -> list[str]:
    """One line per point: index, status, name and settings (for cluster job arrays: ``--point INDEX``)."""
    lines = []
    for i, point in enumerate(sweep.grid.points):
        settings = " ".join(set_arguments(point.settings)[1::2]) or "(the base config)"
        reference = " [reference]" if point.is_base else ""
        lines.append(f"{i}\t{sweep.status(point)}\t{point.name}{reference}\t{settings}")
    return lines


@contextmanager
def point_lock(sweep: Sweep, point: Point) -> Iterator[bool]:
    """Hold the point's lock file while it trains; yields False when another process holds it."""
    path = sweep.out / LOCKS_DIR / f"{point.slug}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_point(sweep: Sweep, point: Point, *, drop: bool) -> str:
    """Train (or resume) one point in this process; returns ``done``, ``skipped`` or ``busy``."""
    from hsqformer.training.engine import run_cv

    folder = sweep.point_dir(point)
    if sweep.status(point) == "done":
        return "skipped"
    with point_lock(sweep, point) as locked:
        if not locked:
            return "busy"
        resume = (folder / RUN_FILE).is_file()
        assert sweep.data is not None  # check_points refused a sweep without data
        run_cv(point.config, sweep.data, sweep.tests, folder, resume=resume, command=sweep.cv_command(point))
        if drop:
            drop_weights(folder)
    return "done"


def run_in_process(sweep: Sweep, indices: Sequence[int], *, drop: bool) -> list[str]:
    """Run the selected points one after the other here; returns one line per point that failed.

    A point that fails is reported and the others still run; an interruption stops the sweep.
    """
    from hsqformer.interrupts import interruption_behind

    failures = []
    total = len(sweep.grid.points)
    for n, i in enumerate(indices, start=1):
        point = sweep.grid.points[i]
        status = sweep.status(point)
        head = f"point {i} '{point.name}' ({n} of {len(indices)} selected, {total} in the grid)"
        if status == "done":
            say(f"{head}: done earlier, skipped")
            continue
        say(f"{head}: {'resuming' if status == 'started' else 'training'} in {sweep.point_dir(point)}")
        try:
            outcome = run_point(sweep, point, drop=drop)
        except HSQformerError as err:
            failures.append(f"point '{point.name}': {err}")
            say(f"{head}: failed: {err}")
            continue
        except Exception as err:
            if interruption_behind(err) is not None:
                raise
            traceback.print_exc()
            failures.append(f"point '{point.name}': {type(err).__name__}: {err}")
            say(f"{head}: failed: {type(err).__name__}: {err}")
            continue
        if outcome == "busy":
            say(f"{head}: another process is training it (lock {sweep.out / LOCKS_DIR}); skipped")
        else:
            say(f"{head}: finished ({progress(sweep)})")
    return failures


def run_children(sweep: Sweep, indices: Sequence[int], jobs: int, devices: Sequence[str], *, drop: bool) -> list[str]:
    """Run the selected points as ``hsqformer sweep ... --point K`` children, ``jobs`` at a time."""
    common = ["sweep", "--config", str(sweep.config), "--grid", str(sweep.grid.path), "--data", str(sweep.data)]
    common += [item for override in sweep.overrides for item in ("--set", override)]
    common += [item for name, source in sweep.tests.items() for item in ("--test", f"{name}={source}")]
    common += ["--out", str(sweep.out), *(["--drop-weights"] if drop else [])]
    todo = [i for i in indices if sweep.status(sweep.grid.points[i]) != "done"]
    for i in indices:
        if i not in todo:
            say(f"point {i} '{sweep.grid.points[i].name}': done earlier, skipped")
    jobs_list = [
        Job(f"point {i} '{sweep.grid.points[i].name}'", [*common, "--point", str(i)],
            sweep.out / LOGS_DIR / f"{sweep.grid.points[i].slug}.log")
        for i in todo
    ]

    def ended(job: Job, status: int) -> None:
        outcome = "finished" if status == 0 else f"failed (exit status {status}): {log_tail(job.log)}"
        say(f"{job.label}: {outcome} ({progress(sweep)})")

    failed = run_jobs(jobs_list, min(jobs, max(1, len(jobs_list))), devices, ended, say)
    return [f"{job.label}: exit status {status}, see {job.log}: {log_tail(job.log)}" for job, status in failed]


def progress(sweep: Sweep) -> str:
    """How many points of the grid are done."""
    done = sum(sweep.status(p) == "done" for p in sweep.grid.points)
    return f"{done} of {len(sweep.grid.points)} points done"


def finished_points(sweep: Sweep) -> list[Point]:
    """The points whose cv run is finished, in grid order."""
    return [p for p in sweep.grid.points if sweep.status(p) == "done"]

