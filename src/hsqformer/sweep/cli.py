"""The ``sweep`` (ablation grids) and ``tune`` (hyper-parameter search) commands."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from hsqformer.errors import HSQformerError

if TYPE_CHECKING:
    from hsqformer.sweep.runner import Sweep

_RESUME_HINT = "finished {what} and folds are kept; run the same command again to continue"


def register(app: typer.Typer) -> None:
    """Add ``sweep`` and ``tune`` to the ``hsqformer`` application."""

    @app.command("sweep")
    def sweep(
        config: Annotated[Path, typer.Option("--config", help="Base config: the reference point of the grid.")],
        grid: Annotated[Path, typer.Option("--grid", help="GRID.yaml: named points and/or a product of settings.")],
        out: Annotated[Path, typer.Option("--out", help="Sweep folder (created, or continued when it exists).")],
        data: Annotated[
            Optional[str], typer.Option("--data", help="Dataset, as for cv (not needed with --list or --report-only).")
        ] = None,
        test: Annotated[Optional[list[str]], typer.Option("--test", help="Test cohort NAME=DATA; repeatable.")] = None,
        set_: Annotated[
            Optional[list[str]], typer.Option("--set", help="Override of the base config KEY=VALUE, for every point.")
        ] = None,
        jobs: Annotated[
            Optional[int], typer.Option("--jobs", min=1, help="Points trained at once, as separate processes "
                                        "(default: one per --devices entry, else 1).")
        ] = None,
        devices: Annotated[
            Optional[str], typer.Option("--devices", help="GPU ids, e.g. 0,1: each job sees one, round-robin.")
        ] = None,
        list_: Annotated[bool, typer.Option("--list", help="Print the points (index, status, name, settings); train nothing.")] = False,
        point: Annotated[
            Optional[list[int]], typer.Option("--point", help="Train only point K (see --list); repeatable. For job "
                                              "arrays: run without --point (or with --report-only) for the report.")
        ] = None,
        report_only: Annotated[bool, typer.Option("--report-only", help="Write the report from the finished points; train nothing.")] = False,
        drop_weights: Annotated[
            bool, typer.Option("--drop-weights", help="Delete each finished point's fold weights (keeps predictions).")
        ] = False,
        resamples: Annotated[int, typer.Option("--resamples", min=100, help="Patient-level bootstrap resamples.")] = 2000,
        reuse: Annotated[
            Optional[list[Path]], typer.Option("--reuse", help="A finished cv run on the same data taken as the point "
                                               "whose config it holds (e.g. the base config); repeatable.")
        ] = None,
    ) -> None:
        """Ablation grid: each point a cv run on the same folds; read by compare (CIs, paired tests, figures)."""
        from hsqformer.interrupts import Interrupted, interruption_behind
        from hsqformer.sweep import runner
        from hsqformer.sweep.processes import parse_devices
        from hsqformer.training.engine import parse_tests

        tests = parse_tests(test or [])
        device_list = parse_devices(devices)
        if reuse and (list_ or report_only):
            raise HSQformerError("--reuse takes runs in when the sweep starts training; leave out --list and "
                                 "--report-only (--point K with the reused point's index links it and trains nothing)")
        sw = runner.open_sweep(config, set_ or [], grid, data, tests, out)
        if list_:
            for line in runner.list_points(sw):
                typer.echo(line)
            return
        count = len(sw.grid.points)
        for k in point or []:
            if not 0 <= k < count:
                raise HSQformerError(f"--point {k}: the grid has {count} points, 0 to {count - 1} (see --list)")
        if report_only:
            _report(sw, resamples)
            return
        indices = sorted(set(point)) if point else list(range(count))
        reused = runner.check_points(sw, indices, reuse or [])
        runner.write_sweep_file(sw)
        runner.reuse_runs(sw, reused)
        n_jobs = jobs or max(1, len(device_list))
        runner.say(f"{count} points in {grid} ({runner.progress(sw)}); {len(indices)} selected, "
                   f"{n_jobs} at a time{' as separate processes' if n_jobs > 1 or device_list else ''}")
        try:
            if n_jobs > 1 or device_list:
                failures = runner.run_children(sw, indices, n_jobs, device_list, drop=drop_weights)
            else:
                failures = runner.run_in_process(sw, indices, drop=drop_weights)
        except (Interrupted, Exception) as err:
            interruption = interruption_behind(err)
            if interruption is None:
                raise
            interruption.hint = _RESUME_HINT.format(what="points")
            raise interruption from None
        if not point:
            try:
                _report(sw, resamples)
            except HSQformerError as err:  # e.g. the reference point failed: say so, then report the failures
                if not failures:
                    raise
                runner.say(f"no report: {err}")
        else:
            pending = any(sw.status(p) != "done" for p in sw.grid.points)
            runner.say(f"{runner.progress(sw)}; " + ("when all are done, write the report with --report-only" if pending
                       else "write the report with the same command and --report-only instead of --point"))
        if failures:
            raise HSQformerError(f"{len(failures)} of {len(indices)} points failed; {failures[0]}")

    @app.command("tune")
    def tune(
        config: Annotated[Path, typer.Option("--config", help="Base config: the recipe whose settings are searched.")],
        space: Annotated[Path, typer.Option("--space", help="SPACE.yaml: the ranges and choices to search.")],
        trials: Annotated[int, typer.Option("--trials", min=1, help="Budget: complete + pruned trials in all.")],
        data: Annotated[str, typer.Option("--data", help="Training data (its CV folds); never a test cohort.")],
        out: Annotated[Path, typer.Option("--out", help="Search folder (created, or continued when it exists).")],
        set_: Annotated[
            Optional[list[str]], typer.Option("--set", help="Override of the base config KEY=VALUE.")
        ] = None,
        seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the TPE sampler.")] = 0,
        jobs: Annotated[
            Optional[int], typer.Option("--jobs", min=1, help="Trials run at once, by worker processes sharing the "
                                        "study (default: one per --devices entry, else 1).")
        ] = None,
        devices: Annotated[
            Optional[str], typer.Option("--devices", help="GPU ids, e.g. 0,1: each worker sees one, round-robin.")
        ] = None,
        keep_weights: Annotated[
            bool, typer.Option("--keep-weights", help="Keep the trials' fold weights (deleted by default: the final "
                               "cv with best.yaml trains the models to keep).")
        ] = False,
        start_from_base: Annotated[
            bool, typer.Option("--start-from-base", help="Run the base config's own settings first, as trial 0 (one "
                               "of the random startup trials), so a search never misses the recipe it starts from.")
        ] = False,
        worker: Annotated[Optional[int], typer.Option("--worker", hidden=True)] = None,
        worker_trials: Annotated[int, typer.Option("--worker-trials", hidden=True, min=1)] = 1,
    ) -> None:
        """Hyper-parameter search (Optuna TPE, median pruning) on patient-level CV AUC of the training data."""
        from hsqformer.interrupts import Interrupted, interruption_behind
        from hsqformer.sweep import tune as search_module
        from hsqformer.sweep.processes import parse_devices

        device_list = parse_devices(devices)
        search = search_module.open_search(config, set_ or [], space, data, out, trials=trials, seed=seed,
                                           keep_weights=keep_weights, start_from_base=start_from_base)
        try:
            if worker is not None:  # a child of a parallel search: the parent holds the lock and writes the results
                search_module.run_trials(search, worker_trials, worker)
                return
            report = search_module.run_search(search, jobs or max(1, len(device_list)), device_list)
        except (Interrupted, Exception) as err:
            interruption = interruption_behind(err)
            if interruption is None:
                raise
            interruption.hint = _RESUME_HINT.format(what="trials")
            raise interruption from None
        typer.echo(f"report: {report}", err=True)
        best = out / "best.yaml"
        if best.is_file():
            typer.echo(f"best recipe: {best}; final CV: hsqformer cv --config {shlex.quote(str(best))} "
                       f"--data {shlex.quote(data)} --out RUN", err=True)


def _report(sw: Sweep, resamples: int) -> None:
    """Write the sweep's report from its finished points and print the headline."""
    from hsqformer.evaluation.comparison_report import summary_lines
    from hsqformer.sweep import runner
    from hsqformer.sweep.report import write_sweep_report

    finished = {p.name: sw.point_dir(p) for p in runner.finished_points(sw)}
    unfinished = [p.name for p in sw.grid.points if p.name not in finished]
    header = [
        f"Grid `{sw.grid.path}`; base config `{sw.config}`"
        + (f" with `{' '.join('--set ' + o for o in sw.overrides)}`" if sw.overrides else "")
        + f"; sweep folder `{sw.out}` (each point's cv run in `{runner.POINTS_DIR}/`).",
    ]
    path, report = write_sweep_report(sw.grid, finished, sw.out / runner.REPORT_DIR, unfinished=unfinished,
                                      header=header, n_resamples=resamples)
    for line in summary_lines(report):
        typer.echo(line)
    typer.echo(f"report: {path}", err=True)
