"""Does resolution help? HSQformer and its backbones alone at several image sizes, on the same folds (issue 16 §2).

Run from the repository root, e.g. (a GPU or a CPU with native bf16; see "Cost"):

    .venv/bin/python benchmarks/resolution.py --data ../shared/data/liver-sysu --name liver-sysu --sizes 224,320,448

For each size S, ``benchmarks/table2.py`` trains the HSQformer config (default: the CPU preset with the projector's
linear-cost attention, configs/cpu_variants/sr_attention.yaml) and each backbone of the CPU preset alone (default
Lite0 and Lite1, each with its own learning rate) with ``--set augment.img_size=S`` into
``benchmarks/runs/table2_NAME_Spx/`` and writes ``benchmarks/results/compare_NAME_Spx_KEY.md``: HSQformer against
each backbone at that size, the backbones given the same chance. Interrupted runs resume, finished ones are reused,
so the study can be spread over sessions or machines one size at a time (``--sizes 224`` now, ``--sizes 320`` later).

Then one ``hsqformer compare`` over every finished (model, size) run, the HSQformer at the first size as reference,
writes ``benchmarks/results/resolution_NAME/`` (compare's report, figures and JSON) and the summary
``benchmarks/results/resolution_NAME.md``: pooled out-of-fold AUC and F1 with 95 % CIs against image size (one line
per model, ``resolution.png``) and, per size, the paired DeLong test of HSQformer against each backbone alone, pooled
and within folds, with Holm's correction over the backbones.

Cost: one 5-fold cv of the CPU preset took 97 min with ``sr`` at 160 px on 2 cores without native bf16 (fp32),
Lite0 or Lite1 alone ~25 min; time grows with the image area, so 224/320/448 px cost ~2x/4x/8x that per model:
about 35 hours on such a CPU, an hour or two on one GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import markdown_header
from table2 import PRESETS, REPO, hsqformer, parse_variants, training_minutes

from hsqformer.sweep.report import METRICS

HERE = Path(__file__).resolve().parent
DEFAULT_HSQFORMER = "hsqformer_s_sr=configs/cpu_variants/sr_attention.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--name", required=True, help="names the run folders (table2_NAME_Spx) and the report")
    parser.add_argument("--sizes", required=True, help="comma-separated image sizes in pixels, e.g. 224,320,448")
    parser.add_argument("--hsqformer", default=DEFAULT_HSQFORMER, metavar="KEY=CONFIG",
                        help=f"the HSQformer config and its run folder's name (default {DEFAULT_HSQFORMER})")
    parser.add_argument("--backbones", default="lite0,lite1",
                        help=f"comma-separated keys of the CPU preset trained alone ({', '.join(list(PRESETS['cpu'])[1:])})")
    parser.add_argument("--labels", help="comma-separated labels to keep, e.g. benign,malignant (busi without normal)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config override for every model and size, e.g. trainer.epochs=5 (repeatable)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    args = parser.parse_args()

    sizes = parse_sizes(args.sizes)
    key = next(iter(parse_variants([args.hsqformer], PRESETS["cpu"], flag="--hsqformer")))
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    wrong = [b for b in backbones if b not in PRESETS["cpu"] or b == "hsqformer_s"]
    if wrong or not backbones:
        sys.exit(f"error: --backbones: unknown key {wrong[0] if wrong else '(none)'} "
                 f"(CPU preset backbones: {', '.join(list(PRESETS['cpu'])[1:])})")
    image_size = [o for o in args.overrides if o.partition("=")[0].strip() == "augment.img_size"]
    if image_size:
        sys.exit(f"error: --set {image_size[0]}: the image size is what --sizes sweeps")

    if not args.report_only:
        for size in sizes:
            table2(args, size, args.hsqformer, backbones)
    runs = {(model, size): folder for size in sizes for model in [key, *backbones]
            if ((folder := HERE / "runs" / f"table2_{args.name}_{size}px" / model) / "metrics.json").is_file()}
    if (key, sizes[0]) not in runs:
        sys.exit(f"error: {key} at {sizes[0]} px (the reference) is not finished; train it first (without --report-only)")
    if len(runs) < 2:
        sys.exit("error: only the reference run is finished; a report needs at least two")

    report_dir = HERE / "results" / f"resolution_{args.name}"
    names = [f"{model}@{size}px" for model, size in runs]
    hsqformer("compare", *(str(folder) for folder in runs.values()), *(a for n in names for a in ("--name", n)),
              "--out", str(report_dir), "--overwrite")
    report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    figure = plot_resolution(report, key, backbones, sizes, report_dir / "resolution.png")
    per_size = {size: per_size_report(args.name, size, key) for size in sizes}
    summary = report_dir.with_suffix(".md")
    summary.write_text(summarize(args, key, backbones, sizes, runs, report, per_size, report_dir, figure),
                       encoding="utf-8")
    print(f"summary: {summary.relative_to(REPO)}", flush=True)


def parse_sizes(text: str) -> list[int]:
    """``--sizes`` as distinct positive multiples of 32 (the backbones' overall stride), in the order given."""
    sizes = []
    for item in text.split(","):
        try:
            size = int(item.strip())
        except ValueError:
            sys.exit(f"error: --sizes: {item.strip()!r} is not a whole number of pixels")
        if size < 32 or size % 32:
            sys.exit(f"error: --sizes: {size} px is not a positive multiple of 32 (the backbones' stride)")
        if size in sizes:
            sys.exit(f"error: --sizes: {size} px is given twice")
        sizes.append(size)
    return sizes


def table2(args: argparse.Namespace, size: int, variant: str, backbones: list[str]) -> None:
    """Train (or reuse) HSQformer and the backbones at one size, and compare them there, with ``table2.py``."""
    command = [sys.executable, str(HERE / "table2.py"), "--preset", "cpu", "--data", args.data,
               "--name", f"{args.name}_{size}px", "--only", ",".join(backbones), "--variant", variant,
               "--set", f"augment.img_size={size}", *(a for o in args.overrides for a in ("--set", o)),
               *(["--labels", args.labels] if args.labels else [])]
    print("+", " ".join(command), flush=True)
    if subprocess.run(command, cwd=REPO).returncode != 0:
        sys.exit(f"error: the {size} px runs failed; fix it and rerun (finished runs are kept)")


def per_size_report(name: str, size: int, key: str) -> dict[str, Any] | None:
    """compare's report of HSQformer against the backbones at one size (written by table2.py), if there is one."""
    path = HERE / "results" / f"compare_{name}_{size}px_{key}" / "report.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def plot_resolution(report: dict[str, Any], key: str, backbones: list[str], sizes: list[int], path: Path) -> Path:
    """AUC and F1 (pooled out-of-fold, 95 % CI whiskers) against image size, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["cohorts"]["validation"]["models"]
    step = 0.015 * (max(sizes) - min(sizes)) or 1.0
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4), constrained_layout=True)
    for ax, (label, read) in zip(axes, METRICS):
        for offset, model in enumerate([key, *backbones]):
            points = [(size, *read(models[f"{model}@{size}px"])) for size in sizes if f"{model}@{size}px" in models]
            if not points:
                continue
            x = [size + (offset - len(backbones) / 2) * step for size, _, _ in points]  # whiskers side by side
            y = [100 * value for _, value, _ in points]
            err = [[100 * (value - ci[0]) for _, value, ci in points], [100 * (ci[1] - value) for _, value, ci in points]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=model, linewidth=2 if model == key else 1)
        ax.set_xticks(sizes)
        ax.set_xlabel("image size (px)")
        ax.set_ylabel(f"{label} (%)")
        ax.set_title(f"{label}, pooled out-of-fold, 95 % CI")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summarize(args: argparse.Namespace, key: str, backbones: list[str], sizes: list[int],
              runs: dict[tuple[str, int], Path], report: dict[str, Any], per_size: dict[int, dict[str, Any] | None],
              report_dir: Path, figure: Path) -> str:
    """The summary page: machine, runs and times, the figure, AUC/F1 per model and size, HSQformer vs backbones."""
    from hsqformer.evaluation.statistics import format_ci, format_p

    models = report["cohorts"]["validation"]["models"]
    head = "| model | " + " | ".join(f"{size} px" for size in sizes) + " |"
    rule = "|---|" + "---|" * len(sizes)
    tables = []
    for label, read in METRICS:
        rows = [f"| {model} | " + " | ".join(
            format_ci(*read(models[f"{model}@{size}px"])) if f"{model}@{size}px" in models else "not run"
            for size in sizes) + " |" for model in [key, *backbones]]
        tables += [f"### {label} (%), pooled out-of-fold, 95 % CI", "", head, rule, *rows, ""]
    tests = []
    for size, part in per_size.items():
        if part is None:
            continue
        cohort = part["cohorts"]["validation"]
        for backbone in backbones:
            pooled, within = cohort["paired"].get(backbone), cohort["fold_stratified"]["paired"].get(backbone)
            if pooled is None or within is None:
                continue
            tests.append(f"| {size} px | {backbone} | {-100 * pooled['auc_difference']:+.1f} | "
                         f"{format_p(pooled['delong_p'])} | {format_p(pooled['delong_p_holm'])} | "
                         f"{-100 * within['auc_difference']:+.1f} | {format_p(within['delong_p'])} | "
                         f"{format_p(within['delong_p_holm'])} |")
    times = [f"| {model} | {size} px | {training_minutes(folder)[0]:.1f} min | `{folder.relative_to(REPO)}` |"
             for (model, size), folder in runs.items()]
    body = (report_dir / "report.md").read_text(encoding="utf-8")
    body = ("\n" + body).replace("](", f"]({report_dir.name}/").replace("\n# ", "\n### ")  # compare's title: a sub-heading here
    return "\n".join([
        markdown_header(f"Resolution study on {args.name}: {key} and its backbones alone at {', '.join(map(str, sizes))} px"),
        "## Runs",
        "",
        f"Data `{args.data}`" + (f", labels {args.labels} only" if args.labels else "")
        + (f"; every model with `{' '.join('--set ' + o for o in args.overrides)}`" if args.overrides else "")
        + f"; HSQformer `{args.hsqformer}`; every run on the same seeded folds.",
        "",
        "| model | size | training time (sum over folds) | run folder (git-ignored) |",
        "|---|---|---|---|",
        *times,
        "",
        "## Accuracy against image size",
        "",
        f"![AUC and F1 against image size]({report_dir.name}/{figure.name})",
        "",
        *tables,
        f"## {key} against each backbone alone, per size",
        "",
        "AUC difference in points (HSQformer minus backbone; compare's own reports give backbone minus reference); paired DeLong on the pooled out-of-fold scores and "
        "within folds (fold-stratified), Holm-corrected over the backbones (per-size reports: "
        f"`benchmarks/results/compare_{args.name}_SIZEpx_{key}.md`).",
        "",
        "| size | backbone | pooled diff | p | p (Holm) | within-fold diff | p | p (Holm) |",
        "|---|---|---|---|---|---|---|---|",
        *(tests or ["| | no per-size report | | | | | | |"]),
        "",
        f"## All runs against {key}@{sizes[0]}px (compare)",
        "",
        body,
    ])


if __name__ == "__main__":
    main()
