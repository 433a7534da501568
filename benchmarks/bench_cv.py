"""HSQformer against each of its backbones alone: same data, folds and recipe, one Table-2-style report.

Run from the repository root, e.g. (hours on a 2-core CPU):

    .venv/bin/python benchmarks/bench_cv.py --config configs/cpu.yaml \
        --data ../shared/data/liver-sysu --name liver-sysu_cpu

For the config's HSQformer and for each backbone named in its ``model.kwargs.backbones``
(or the variant's default backbones) trained alone as a plain timm classifier with the
same recipe (dropout, stochastic depth, pretrained weights), this runs ``hsqformer cv``
into ``benchmarks/runs/NAME/MODEL/`` (git-ignored), checks that all runs used identical
splits, computes the data audit's shortcut floor (a random forest on image size and
grey-level histogram, on the same folds) and writes ``benchmarks/results/cv_NAME.md``
with the command, machine, versions, config, wall times and the comparison tables.
``--resume`` continues an interrupted benchmark (done folds are kept).

The shared recipe is tuned for HSQformer; ``--alone-set KEY=VALUE`` (repeatable) adds a second
run of each backbone alone with those overrides on top (e.g. its own learning rate), so that
HSQformer is also compared with baselines given a recipe of their own. ``--labels`` keeps only
some classes of the data (e.g. busi's benign and malignant), writing the rows kept to
``benchmarks/runs/NAME/manifest.csv``; ``--notes FILE`` puts hand-written remarks (a verdict, the
run's history) into the report, so that regenerating it keeps them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import keep_labels, markdown_header  # noqa: E402
from hsqformer.errors import HSQformerError  # noqa: E402
from hsqformer.evaluation.report import comparison_tables, fold_table  # noqa: E402
from hsqformer.training.config import Config, config_from_dict, config_to_dict, load_config  # noqa: E402
from hsqformer.training.engine import parse_tests, run_cv  # noqa: E402
from hsqformer.training.run_folder import DONE_FILE, RUN_FILE  # noqa: E402
from hsqformer.files import write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
BACKBONE_RECIPE_KEYS = ("drop_rate", "drop_path_rate")


def hsqformer_backbones(cfg: Config) -> list[str]:
    """The two backbones of the config's HSQformer variant."""
    from hsqformer.models.hsqformer import VARIANTS

    if cfg.model.name not in VARIANTS:
        raise HSQformerError(f"model.name '{cfg.model.name}' is not an HSQformer variant ({', '.join(VARIANTS)})")
    return list(cfg.model.kwargs.get("backbones") or VARIANTS[cfg.model.name]["backbones"])


def backbone_config(cfg: Config, index: int, name: str, overrides: list[str] | None = None) -> Config:
    """The config with backbone ``index`` trained alone: same recipe (then ``overrides``), its own weights."""
    raw = config_to_dict(cfg)
    kwargs = cfg.model.kwargs
    sources = kwargs.get("pretrained_backbones", False)
    source = sources[index] if isinstance(sources, list) else sources
    raw["model"] = {
        **raw["model"],
        "name": name,
        "pretrained": source if source is not None else False,
        "kwargs": {key: kwargs[key] for key in BACKBONE_RECIPE_KEYS if key in kwargs},
    }
    return config_from_dict(raw, overrides=overrides or ())


def folder(label: str) -> str:
    """The run folder name of a benchmark row."""
    return label.replace(", ", "_").replace(" ", "_")


def read_notes(path: Path) -> str:
    """The text of the ``--notes`` file."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise HSQformerError(f"--notes {path}: cannot read ({err.__class__.__name__})") from None


def training_time(run_dir: Path) -> str:
    """The summed wall time of a run's folds (from their done files), noting resumed folds."""
    done = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(run_dir.glob(f"fold_*/{DONE_FILE}"))]
    resumed = sum(d.get("resumed_from_epoch") is not None for d in done)
    return f"{sum(d['wall_seconds'] for d in done) / 60:.1f} min" + (f" ({resumed} resumed)" if resumed else "")


def run_one(
    label: str, cfg: Config, args: argparse.Namespace, data: str, tests: dict[str, str], out: Path
) -> tuple[dict, float]:
    resume = args.resume and (out / RUN_FILE).is_file()
    print(f"[bench_cv] {label}: {'resuming' if resume else 'starting'} {out}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    metrics = run_cv(cfg, data, tests, out, overwrite=args.overwrite, resume=resume, command=" ".join(sys.argv))
    return metrics, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--test", action="append", default=[], help="NAME=DATA test cohort; repeatable")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="config override KEY=VALUE")
    parser.add_argument("--alone-set", action="append", default=[], dest="alone_overrides",
                        help="KEY=VALUE for an extra run of each backbone alone with its own recipe; repeatable")
    parser.add_argument("--labels", help="comma-separated labels to keep, e.g. benign,malignant")
    parser.add_argument("--notes", type=Path, help="markdown file whose text goes into the report, under its header")
    parser.add_argument("--name", required=True, help="report name: benchmarks/results/cv_NAME.md")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier runs of this name")
    parser.add_argument("--resume", action="store_true", help="continue earlier runs of this name")
    args = parser.parse_args()
    try:
        report = benchmark(args)
    except HSQformerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(report)


def benchmark(args: argparse.Namespace) -> str:
    from hsqformer.data.audit import run_audit

    notes = read_notes(args.notes) if args.notes else None
    cfg = load_config(args.config, args.overrides)
    tests = parse_tests(args.test)
    backbones = hsqformer_backbones(cfg)
    configs = {cfg.model.name: cfg, **{f"{b} alone": backbone_config(cfg, i, b) for i, b in enumerate(backbones)}}
    if args.alone_overrides:
        configs |= {f"{b} alone, own recipe": backbone_config(cfg, i, b, args.alone_overrides)
                    for i, b in enumerate(backbones)}
    runs_dir = HERE / "runs" / args.name
    data = keep_labels(args.data, args.labels, runs_dir, args.overwrite) if args.labels else args.data
    outs = {label: runs_dir / folder(label) for label in configs}
    results, walls = {}, {}
    for label, model_cfg in configs.items():
        results[label], walls[label] = run_one(label, model_cfg, args, data, tests, outs[label])

    splits = [pd.read_csv(out / "splits.csv", dtype=str, keep_default_na=False) for out in outs.values()]
    if any(not s.equals(splits[0]) for s in splits[1:]):
        raise HSQformerError(f"runs under {runs_dir} used different splits; rerun with --overwrite")
    frame = splits[0].drop(columns="fold")
    audit = run_audit(
        [frame], results[cfg.model.name]["classes"], cfg.cv.n_folds, cfg.cv.seed,
        positive_class=results[cfg.model.name]["positive_class"], progress=False,
    )
    floor = audit.shortcut_auc
    missing_ids = int((frame["patient_id"] == "").sum())
    level = "patient-level" if missing_ids < len(frame) else "image-level"
    binary = len(results[cfg.model.name]["classes"]) == 2
    floors = {f"shortcut floor ({floor.features}, {floor.metric})": floor.mean} if floor else {}

    lines = [
        markdown_header(f"Cross-validation benchmark: {cfg.model.name} vs its backbones alone ({args.name})"),
        *([notes, ""] if notes else []),
        f"Data: `{args.data}` ({len(frame)} images used"
        + (f", labels {args.labels} only, rows written to `{Path(data).relative_to(HERE.parent)}`"
           if args.labels else "")
        + (f", subset data.max_images={cfg.data.max_images}" if cfg.data.max_images else "")
        + f"); test cohorts: {', '.join(f'{k}=`{v}`' for k, v in tests.items()) or 'none'}.",
        f"All runs use the same {cfg.cv.n_folds} {level} folds (seed {cfg.cv.seed}; splits files identical) "
        "and the same recipe; each backbone alone is the plain timm classifier with the same dropout, "
        "stochastic depth and pretrained weights."
        + (f" {missing_ids} of {len(frame)} images have no patient id, so their folds are image-level: images of "
           "one patient may sit on both sides of a split, which flatters every row alike." if missing_ids else "")
        + (f" The 'own recipe' rows change only: `{' '.join(args.alone_overrides)}`." if args.alone_overrides else ""),
        "",
        "| Model | Run folder | Training time (sum over folds) | Wall time of this invocation |",
        "|---|---|---|---|",
        *(f"| {label} | `{out.relative_to(HERE.parent)}` | {training_time(out)} | {walls[label] / 60:.1f} min |"
          for label, out in outs.items()),
        "",
        "A fold resumed after an interruption counts only the time after it resumed.",
        "",
        "## Results (%, mean±std over folds; ensemble = mean probability of the fold models)",
        "",
        comparison_tables(results, floors),
        "The shortcut floor is the audit's cross-validated AUC of a random forest on image statistics only "
        + (f"({floor}, mean ± std over the same folds)" if floor else "(not computed)")
        + ": a model has to beat it, not 0.5.",
        "",
        f"## Validation {'AUC' if binary else 'macro AUC (one-vs-rest)'} fold by fold (%)",
        "",
        fold_table(results, "auc" if binary else "auc_macro_ovr",
                   ("the shortcut floor", floor.fold_aucs) if floor else None),
        "## Config of the HSQformer run",
        "",
        "```yaml",
        yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    report = "\n".join(lines)
    write_text(HERE / "results" / f"cv_{args.name}.md", report)
    return report


if __name__ == "__main__":
    main()
