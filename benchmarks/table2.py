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
writes ``benchmarks/results/compare_NAME_tunedN/``. Without the flag each config runs with its own fixed recipe.

    .venv/bin/python benchmarks/table2.py --preset cpu --data ../shared/data/liver-sysu --name liver-sysu_cpu \
        --only hsqformer_s,lite0,lite1 --tune-trials 8

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

``--labels`` keeps some classes of the data (written as ``manifest.csv`` in the run folder, which every model
reads) and ``--set KEY=VALUE`` changes every model's config alike, e.g. busi benign vs malignant, smaller:

    .venv/bin/python benchmarks/table2.py --preset cpu --data ../shared/data/busi --labels benign,malignant \
        --set augment.img_size=128 --set trainer.epochs=5 --name busi-benign-malignant_cpu
- ``paper``: HSQformer-B of configs/paper.yaml against the twelve baselines of configs/baselines/
  (GPU; ImageNet weights must be reachable, see the configs' comments).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import keep_labels, markdown_header

from hsqformer.errors import HSQformerError

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


def hsqformer(*args: str) -> None:
    """Run one ``hsqformer`` command of this environment; stop the benchmark if it fails."""
    command = [str(Path(sys.executable).with_name("hsqformer")), *args]
    print("+", " ".join(command), flush=True)
    if subprocess.run(command, cwd=REPO).returncode != 0:
        sys.exit(f"error: {' '.join(command[1:3])} failed; fix it and rerun this benchmark (finished runs are kept)")


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
    parser.add_argument("--notes", type=Path, help="markdown file whose text goes into the summary, under its header")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=CONFIG",
                        help="a changed HSQformer config, trained too and made the reference (repeatable)")
    args = parser.parse_args()
    if args.tune_trials is not None and args.tune_trials < 1:
        sys.exit(f"error: --tune-trials must be at least 1, got {args.tune_trials}")
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
    runs = HERE / "runs" / f"table2_{name}"
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
            hsqformer("tune", "--config", config, "--space", SPACES[args.preset], "--trials", str(args.tune_trials),
                      "--data", data, *overrides, "--out", str(search))
            config = str(search / "best.yaml")
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
    summary.write_text(summarize(args, report_name, configs, runs, report, notes), encoding="utf-8")
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


def training_minutes(run: Path) -> tuple[float, int]:
    """Training wall time of a finished run (sum over folds, minutes) and how many folds were resumed."""
    done = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(run.glob("fold_*/done.json"))]
    resumed = sum(1 for d in done if d.get("resumed_from_epoch") is not None)
    return sum(d.get("wall_seconds", 0.0) for d in done) / 60, resumed


def summarize(
    args: argparse.Namespace, name: str, configs: dict[str, str], runs: Path, report: Path, notes: str | None
) -> str:
    """The benchmark's summary page: machine, runs, training times, then compare's report with its figures."""
    rows = []
    for key, config in configs.items():
        run = runs / key
        if not (run / "metrics.json").is_file():
            rows.append(f"| {key} | `{config}` | not run | |")
            continue
        minutes, resumed = training_minutes(run)
        note = f" ({resumed} fold(s) resumed: time after resuming only)" if resumed else ""
        rows.append(f"| {key} | `{config}` | {minutes:.1f} min{note} | `{run.relative_to(REPO)}` |")
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
        + f"; every run on the same seeded folds; compare's report, figures and JSON in `{report.relative_to(REPO)}/`.",
        "",
        "| key | config | training time (sum over folds) | run folder (git-ignored) |",
        "|---|---|---|---|",
        *rows,
        "",
        body,
    ])


if __name__ == "__main__":
    main()
