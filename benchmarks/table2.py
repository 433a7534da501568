"""Table 2 with evidence: HSQformer and its baselines on the same folds, judged by ``hsqformer compare``.

Run from the repository root, e.g.:

    .venv/bin/python benchmarks/table2.py --preset cpu --data ../shared/data/liver-sysu --name liver-sysu_cpu
    .venv/bin/python benchmarks/table2.py --preset paper --data DATA --test high-risk=TEST3 --name paper  # GPU

Each config of the preset is trained with ``hsqformer cv`` into ``benchmarks/runs/table2_NAME/<key>/``
(git-ignored; an interrupted run is resumed, a finished one reused), all on the data's seeded
patient-level folds; then ``hsqformer compare`` (with the shortcut floor as one more model and the
first config as reference) writes ``benchmarks/results/compare_NAME/`` (report.md, figures, JSON), and
``benchmarks/results/compare_NAME.md`` gathers the machine, each model's training time and that report
(``--notes FILE`` adds hand-written remarks, e.g. the verdict, under the header).

With ``--tune-trials N`` every model first gets the same tuning budget (Table 2's fairness rule): ``hsqformer
tune`` runs N trials of the preset's search space (configs/tune/PRESET.yaml: learning rate, backbone rate, weight
decay, drop path, mixup on/off; patient-level CV AUC on the training data only, never a test cohort) into
``benchmarks/runs/table2_NAME_tunedN/tune/<key>/``; then each model's final cross-validation runs with its best
recipe (``best.yaml``), test cohorts included, into ``benchmarks/runs/table2_NAME_tunedN/<key>/``, and compare
writes ``benchmarks/results/compare_NAME_tunedN/``. Without a test cohort the final run is the best trial's cv
run, copied: best.yaml on the same folds with the same seed would only repeat it. Without the flag each config
runs with its own fixed recipe. With ``--tune-from-base`` too, each search's trial 0 is the model's own config
(``hsqformer tune --start-from-base``), so no model's tuned recipe falls below its hand recipe by the luck of the
draws; the folders are then named ``NAME_tunedN_from_base``.

Each search is also copied, without weights or unfinished folds, to ``benchmarks/results/tune_NAME_tunedN/<key>/``
(its report, best.yaml and trials, and the study and trial folders it resumes from), after it ends and when it is
stopped (Ctrl-C, or SIGTERM to the ``hsqformer tune`` process): a search longer than one session goes on elsewhere
once that folder is copied back to the run folder.
``--only`` sets the order, so the cheap models can go first:

    .venv/bin/python benchmarks/table2.py --preset cpu --data ../shared/data/liver-sysu --name liver-sysu_cpu \
        --only lite0,lite1,hsqformer_s --tune-trials 4

With ``--variant KEY=CONFIG`` (repeatable) the benchmark asks whether a change of HSQformer helps: each variant
is trained into the same run folder as the preset (whose finished runs are reused) and becomes the reference, so
compare tests it against the preset's HSQformer and every backbone alone, on the same folds; the report goes to
``benchmarks/results/compare_NAME_KEY/`` (``_KEY1_KEY2`` for several), the preset's own report is left as it is.

    .venv/bin/python benchmarks/table2.py --preset cpu --data ../shared/data/liver-sysu --name liver-sysu_cpu \
        --variant hsqformer_s_pooled=configs/cpu_variants/pooled_head.yaml

Presets:
- ``cpu``: HSQformer-S of configs/cpu.yaml against EfficientNet-Lite0/1/2 alone, each with a learning
  rate of its own (configs/cpu_baselines/). On liver-sysu, 2 cores without native bf16 (fp32): HSQformer-S
  ~105 min, Lite0 ~25 min (compare_liver-sysu_cpu.md has every model's time).
- ``paper``: HSQformer-B of configs/paper.yaml against the twelve baselines of configs/baselines/
  (GPU; ImageNet weights must be reachable, see the configs' comments).

``--labels`` keeps some classes of the data (written as ``manifest.csv`` in the run folder, which every model
reads) and ``--set KEY=VALUE`` changes every model's config alike, e.g. busi benign vs malignant, smaller:

    .venv/bin/python benchmarks/table2.py --preset cpu --data ../shared/data/busi --labels benign,malignant \
        --set augment.img_size=128 --set trainer.epochs=5 --name busi-benign-malignant_cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from common import keep_labels, markdown_header

from hsqformer.errors import HSQformerError
from hsqformer.training.config import config_to_dict, first_difference, load_config
from hsqformer.training.run_folder import read_saved_config

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SPACES = {"cpu": "configs/tune/cpu.yaml", "paper": "configs/tune/paper.yaml"}
PRESETS = {
    "cpu": {
        "hsqformer_s": "configs/cpu.yaml",
        "lite0": "configs/cpu_baselines/lite0.yaml",
        "lite1": "configs/cpu_baselines/lite1.yaml",
        "lite2": "configs/cpu_baselines/lite2.yaml",
    },
    "paper": {
        "hsqformer_b": "configs/paper.yaml",
        **{path.stem: str(path.relative_to(REPO)) for path in sorted((REPO / "configs" / "baselines").glob("*.yaml"))},
    },
}


def run_hsqformer(*args: str) -> int:
    """Run one ``hsqformer`` command of this environment; its exit status (130 after Ctrl-C)."""
    command = [str(Path(sys.executable).with_name("hsqformer")), *args]
    print("+", " ".join(command), flush=True)
    try:
        return subprocess.run(command, cwd=REPO).returncode
    except KeyboardInterrupt:  # the command got the Ctrl-C too and ended; what it kept is saved by the caller
        return 130


def hsqformer(*args: str) -> None:
    """Run one ``hsqformer`` command of this environment; stop the benchmark if it fails."""
    if run_hsqformer(*args) != 0:
        sys.exit(f"error: {' '.join(args[:2])} failed; fix it and rerun this benchmark (finished runs are kept)")


def save_search(search: Path, saved: Path) -> None:
    """Copy a search folder into the results without weights or unfinished folds: its report, and all it resumes from.

    ``study.db``, ``tune.json`` and the trials' cv folders (finished folds only) are what ``hsqformer tune``
    needs to go on where it stopped, so a search longer than one machine's session continues on another.
    """
    def left_out(folder: str, names: list[str]) -> set[str]:
        unfinished = {n for n in names if n.startswith("fold_") and not (Path(folder) / n / "done.json").is_file()}
        return unfinished | {n for n in names if n.endswith(".safetensors") or n in ("lightning", "logs", "tune.lock")}

    if search.is_dir():
        replace_with_copy(search, saved, left_out)


def replace_with_copy(source: Path, dest: Path, ignore: Callable[[str, list[str]], set[str]]) -> None:
    """Copy ``source`` to ``dest`` (replacing it) without what ``ignore`` names; ``dest`` is whole or left as it was."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=ignore)
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--test", action="append", default=[], help="NAME=DATA test cohort (repeatable)")
    parser.add_argument("--name", required=True, help="names the run folder and the report")
    parser.add_argument("--only", help="comma-separated config keys to train (default: all of the preset)")
    parser.add_argument("--labels", help="comma-separated labels to keep, e.g. benign,malignant (busi without normal)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config override for every model, e.g. trainer.epochs=5 (repeatable)")
    parser.add_argument("--target-sensitivity", type=float, default=None)
    parser.add_argument("--tune-trials", type=int, default=None,
                        help="tune every model with this many trials of the preset's space, then train its best recipe")
    parser.add_argument("--tune-from-base", action="store_true",
                        help="with --tune-trials: each search's trial 0 is the model's own config (tune --start-from-base)")
    parser.add_argument("--notes", type=Path, help="markdown file whose text goes into the summary, under its header")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=CONFIG",
                        help="a changed HSQformer config, trained too and made the reference (repeatable)")
    args = parser.parse_args()
    if args.tune_trials is not None and args.tune_trials < 1:
        sys.exit(f"error: --tune-trials must be at least 1, got {args.tune_trials}")
    if args.tune_from_base and args.tune_trials is None:
        sys.exit("error: --tune-from-base needs --tune-trials")
    try:
        notes = args.notes.read_text(encoding="utf-8").strip() if args.notes else None
    except (OSError, UnicodeDecodeError) as err:
        sys.exit(f"error: --notes {args.notes}: cannot read ({err.__class__.__name__})")

    preset = PRESETS[args.preset]
    keys = [k.strip() for k in args.only.split(",")] if args.only else list(preset)
    unknown = [k for k in keys if k not in preset]
    if unknown:
        sys.exit(f"error: --only: unknown key {unknown[0]} (preset {args.preset}: {', '.join(preset)})")
    variants = parse_variants(args.variant, preset)
    configs = {**variants, **preset}  # a variant first: the reference of the comparison
    keys = [*variants, *keys]
    name = args.name if args.tune_trials is None else f"{args.name}_tuned{args.tune_trials}"
    name += "_from_base" if args.tune_from_base else ""
    runs = HERE / "runs" / f"table2_{name}"
    searches = HERE / "results" / f"tune_{name}"  # each search saved, committed with the results
    report_name = "_".join([name, *variants])
    data = args.data
    if args.labels:
        try:
            data = keep_labels(args.data, args.labels, runs, overwrite=False)
        except HSQformerError as err:
            sys.exit(f"error: {err}")
    overrides = [item for setting in args.overrides for item in ("--set", setting)]
    for key in keys:
        out = runs / key
        if (out / "metrics.json").is_file():
            print(f"{key}: finished earlier, reused", flush=True)
            continue
        config = configs[key]
        if args.tune_trials is not None:  # equal budget: the same number of trials of the same space for every model
            search = runs / "tune" / key
            status = run_hsqformer("tune", "--config", config, "--space", SPACES[args.preset], "--trials",
                                   str(args.tune_trials), "--data", data, *overrides, "--out", str(search),
                                   *(["--start-from-base"] if args.tune_from_base else []))
            save_search(search, searches / key)
            if status != 0:
                sys.exit(f"error: tune failed or was stopped; rerun this benchmark to resume (elsewhere: copy "
                         f"{searches.relative_to(REPO) / key}, the search so far, back to {search.relative_to(REPO)})")
            config = str(search / "best.yaml")
            trial = None if args.test else best_trial_run(search)
            if trial is not None:
                replace_with_copy(trial, out, shutil.ignore_patterns("*.safetensors", "lightning"))
                print(f"{key}: final run = {trial.relative_to(REPO)}, copied (without a test cohort, best.yaml's "
                      "cross-validation on the same folds would repeat that trial)", flush=True)
                continue
        if (out / "run.json").is_file():
            hsqformer("cv", "--out", str(out), "--resume")
        else:
            tests = [item for test in args.test for item in ("--test", test)]
            tuned = args.tune_trials is not None  # best.yaml already holds the overrides
            hsqformer("cv", "--config", config, "--data", data, *tests, *([] if tuned else overrides), "--out", str(out))
    finished = [str(runs / key) for key in configs if (runs / key / "metrics.json").is_file()]
    if not finished:
        sys.exit("error: no finished run to compare")
    report = HERE / "results" / f"compare_{report_name}"
    extra = ["--target-sensitivity", str(args.target_sensitivity)] if args.target_sensitivity else []
    hsqformer("compare", *finished, "--floor", "--out", str(report), "--overwrite", *extra)
    summary = report.with_suffix(".md")
    summary.write_text(summarize(args, report_name, configs, runs, searches, report, notes), encoding="utf-8")
    print(f"summary: {summary.relative_to(REPO)}", flush=True)


def parse_variants(items: list[str], preset: dict[str, str], flag: str = "--variant") -> dict[str, str]:
    """``KEY=CONFIG`` items as {key: config}; a bad item stops the benchmark in one line before anything trains."""
    variants: dict[str, str] = {}
    for item in items:
        key, sep, config = (part.strip() for part in item.partition("="))
        where = f"error: {flag} {item!r}"
        if not sep or not key or not config:
            sys.exit(f"{where}: expected KEY=CONFIG, e.g. hsqformer_s_sr=configs/cpu_variants/sr_attention.yaml")
        if not key.replace("_", "").replace("-", "").isalnum():
            sys.exit(f"{where}: the key names a run folder: letters, digits, '_' and '-' only")
        if key in preset or key in variants:
            sys.exit(f"{where}: key {key} is taken (preset keys: {', '.join(preset)})")
        if not (REPO / config).is_file():
            sys.exit(f"{where}: config file not found: {config}")
        variants[key] = config
    return variants


def best_trial_run(search: Path) -> Path | None:
    """The finished cv run of a search's trial whose config is the search's ``best.yaml``, or None.

    Without a test cohort the final cross-validation of best.yaml would train that trial again on the
    same folds with the same seed; its run is taken instead.
    """
    best = search / "best.yaml"
    if not best.is_file():
        return None
    recipe = config_to_dict(load_config(best))
    for trial in sorted((search / "trials").glob("trial_*")):
        finished = (trial / "metrics.json").is_file()
        if finished and first_difference(config_to_dict(read_saved_config(trial)), recipe) is None:
            return trial
    return None


def tuning_minutes(search: Path) -> tuple[float, int]:
    """Wall time of a search's trials (minutes, complete and pruned) and how many trials that is."""
    table = search / "trials.csv"
    if not table.is_file():
        return 0.0, 0
    trials = pd.read_csv(table)
    counted = trials[trials["state"].isin(["complete", "pruned"])]
    return float(counted["minutes"].fillna(0).sum()), len(counted)


def training_minutes(run: Path) -> tuple[float, int]:
    """Training wall time of a finished run (sum over folds, minutes) and how many folds were resumed."""
    done = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(run.glob("fold_*/done.json"))]
    resumed = sum(1 for d in done if d.get("resumed_from_epoch") is not None)
    return sum(d.get("wall_seconds", 0.0) for d in done) / 60, resumed


def summarize(
    args: argparse.Namespace, name: str, configs: dict[str, str], runs: Path, searches: Path, report: Path,
    notes: str | None,
) -> str:
    """The benchmark's summary page: machine, runs, training times, then compare's report with its figures."""
    tuned = args.tune_trials is not None
    rows = []
    for key, config in configs.items():
        run = runs / key
        tuning = ""
        if tuned and not (searches / key / "report.md").is_file():
            tuning = " not tuned |"
        elif tuned:
            minutes, count = tuning_minutes(searches / key)
            tuning = f" {count} trials, {minutes:.1f} min: [report]({searches.name}/{key}/report.md) |"
        if not (run / "metrics.json").is_file():
            rows.append(f"| {key} | `{config}` |{tuning} not run | |")
            continue
        minutes, resumed = training_minutes(run)
        note = f" ({resumed} fold(s) resumed: time after resuming only)" if resumed else ""
        rows.append(f"| {key} | `{config}` |{tuning} {minutes:.1f} min{note} | `{run.relative_to(REPO)}` |")
    if tuned:
        final = (
            "each final run is its search's best trial, copied (without a test cohort, best.yaml's cross-validation "
            "on the same folds would repeat it)" if not args.test else "each final run trains its search's best.yaml"
        )
        runs_text = (
            f" Every model first got the same tuning budget, {args.tune_trials} trials of `{SPACES[args.preset]}`"
            f"{' (trial 0: the base config itself)' if args.tune_from_base else ''}, judged by cross-validation on the training data; the searches (report, best.yaml, trials, study) are in "
            f"`{searches.relative_to(REPO)}/`; {final}. The best of a few trials chosen on these folds is "
            "optimistic for every model alike."
        )
        head = ["| key | base config | tuning (trials, time) | final run: training time (sum over folds) "
                "| run folder (git-ignored) |", "|---|---|---|---|---|"]
    else:
        runs_text = ""
        head = ["| key | config | training time (sum over folds) | run folder (git-ignored) |", "|---|---|---|---|"]
    body = (report / "report.md").read_text(encoding="utf-8")
    body = ("\n" + body).replace("](", f"]({report.name}/").replace("\n# ", "\n## ")  # figures live in the report folder
    return "\n".join([
        markdown_header(f"Table 2 on {name}: preset {args.preset}, paired comparison"),
        *(["## Verdict (written by hand)", "", notes, ""] if notes else []),
        "## Runs",
        "",
        f"Data `{args.data}`"
        + (f", labels {args.labels} only" if args.labels else "")
        + (f"; every model with `{' '.join('--set ' + o for o in args.overrides)}`" if args.overrides else "")
        + f"; every run on the same seeded folds; compare's report, figures and JSON in `{report.relative_to(REPO)}/`."
        + runs_text,
        "",
        *head,
        *rows,
        "",
        body,
    ])


if __name__ == "__main__":
    main()
