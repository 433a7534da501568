"""The ``hsqformer compare`` report folder: report.md with its figures, report.json and per_image.csv."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hsqformer.evaluation import figures
from hsqformer.evaluation.compare import REPORT_FORMAT, VALIDATION, RunScores, per_image_table
from hsqformer.evaluation.statistics import COUNT_METRICS, METRIC_LABELS, format_ci, format_p
from hsqformer.files import prepare_report_dir, write_csv, write_json, write_text


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty folder unless ``overwrite`` and it holds an earlier comparison."""
    prepare_report_dir(out, overwrite, REPORT_FORMAT, "a compare report")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The headline per cohort: each model's AUC with its CI and the DeLong p against the reference."""
    lines = []
    for cohort, part in report["cohorts"].items():
        lines += _auc_lines(f"{cohort} ({part['n_images']} images), AUC [95% CI]:", part)
        stratified = part.get("fold_stratified", {})
        if "models" in stratified:
            title = f"{cohort}, mean of the {stratified['n_folds']} fold AUCs [95% CI] (within-fold DeLong):"
            lines += _auc_lines(title, stratified)
    return lines


def _auc_lines(title: str, part: dict[str, Any]) -> list[str]:
    lines = [title]
    for model, values in part["models"].items():
        paired = part["paired"].get(model)
        test = (
            f"  DeLong p {format_p(paired['delong_p'])} (Holm {format_p(paired['delong_p_holm'])})"
            if paired else "  (reference)"
        )
        lines.append(f"  {model:<28} {format_ci(values['auc'], values['auc_ci'])}{test}")
    return lines


def write_comparison(runs: Sequence[RunScores], report: dict[str, Any], out: Path, seed: int = 0) -> Path:
    """Write figures, per_image.csv, report.json and report.md into ``out``; returns report.md's path."""
    out.mkdir(parents=True, exist_ok=True)
    pictures: dict[str, dict[str, str]] = {}
    for cohort in report["cohorts"]:
        pictures[cohort] = {
            "roc": figures.roc_figure(runs, cohort, report, out / f"roc_{cohort}.png", seed).name,
            "confusion": figures.confusion_figure(runs, cohort, report, out / f"confusion_{cohort}.png").name,
            "calibration": figures.calibration_figure(runs, cohort, report, out / f"calibration_{cohort}.png").name,
        }
    folds_png = figures.fold_auc_figure(runs, out / "fold_auc.png").name
    report = {**report, "figures": {"cohorts": pictures, "fold_auc": folds_png}}
    write_csv(out / "per_image.csv", per_image_table(runs, report))
    write_json(out / "report.json", report)
    return write_text(out / "report.md", markdown(report))


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _metrics_table(part: dict[str, Any], key: str, with_threshold: bool) -> list[str]:
    head = ["model", "AUC [95% CI]", *(METRIC_LABELS[m] for m in COUNT_METRICS)]
    if with_threshold:
        head.insert(1, "threshold")
    lines = [_row(head), _row(["---"] * len(head))]
    for name, model in part["models"].items():
        point = model[key]
        cells = [name, format_ci(model["auc"], model["auc_ci"])]
        cells += [format_ci(point[m]["value"], point[m]["ci"]) for m in COUNT_METRICS]
        if with_threshold:
            cells.insert(1, f"{point['threshold']:.3f}")
        lines.append(_row(cells))
    return lines


def _paired_table(part: dict[str, Any], reference: str) -> list[str]:
    head = [
        "model", f"ΔAUC vs {reference}", "DeLong p", "Holm p", "sensitivity: McNemar p (Holm)",
        "specificity: McNemar p (Holm)", "significant at 0.05 (Holm)",
    ]
    lines = [_row(head), _row(["---"] * len(head))]
    for name, row in part["paired"].items():
        verdict = [label for label, key in (("AUC", "delong"), ("sens.", "sensitivity"), ("spec.", "specificity"))
                   if row[f"{key}_significant"]]
        lines.append(_row([
            name,
            f"{100 * row['auc_difference']:+.1f}",
            format_p(row["delong_p"]),
            format_p(row["delong_p_holm"]),
            f"{format_p(row['sensitivity_p'])} ({format_p(row['sensitivity_p_holm'])})",
            f"{format_p(row['specificity_p'])} ({format_p(row['specificity_p_holm'])})",
            ", ".join(verdict) if verdict else "no",
        ]))
    return lines


def _fold_stratified_lines(part: dict[str, Any], reference: str) -> list[str]:
    stratified = part.get("fold_stratified")
    if stratified is None:
        return []
    title = "### The paper's statistic, paired: mean of the fold AUCs (within-fold DeLong)"
    if "models" not in stratified:
        return ["", title, "", f"Not computed: {stratified['skipped']}."]
    lines = [
        "", title, "",
        f"Each model's mean of its {stratified['n_folds']} per-fold validation AUCs (Table 2's statistic), with a CI "
        "and a paired test that combine the DeLong variances of the folds (disjoint images, hence independent). "
        "Scores are only compared within a fold, so unlike the pooled AUC above it does not penalise fold models "
        "whose scores sit on different scales.",
        "",
    ]
    head = ["model", "mean fold AUC [95% CI]", f"ΔAUC vs {reference}", "DeLong p", "Holm p", "significant at 0.05 (Holm)"]
    lines += [_row(head), _row(["---"] * len(head))]
    for name, model in stratified["models"].items():
        row = stratified["paired"].get(name)
        tail = (
            [f"{100 * row['auc_difference']:+.1f}", format_p(row["delong_p"]), format_p(row["delong_p_holm"]),
             "yes" if row["delong_significant"] else "no"]
            if row else ["reference", "", "", ""]
        )
        lines.append(_row([name, format_ci(model["auc"], model["auc_ci"]), *tail]))
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: how to read it, then per cohort the tables and figures."""
    op = report["operating_point"]
    boot = report["bootstrap"]
    ref = report["reference"]
    lines = [
        "# Model comparison",
        "",
        f"Positive class: **{report['positive_class']}**. Reference model: **{ref}**. Models: "
        + ", ".join(f"`{r['name']}` ({r['model']})" for r in report["runs"]) + ".",
        "",
        "How to read this report:",
        "",
        f"- `{VALIDATION}` pools every model's out-of-fold predictions (each image scored by the fold model that "
        "did not train on it); a test cohort is scored by the mean of the fold models (the ensemble).",
        "- AUC with DeLong's 95 % CI; the other metrics with a percentile bootstrap CI "
        f"({boot['resamples']} resamples of **patients**, seed {boot['seed']}), so images of one patient move together.",
        f"- Operating point: chosen per model by **{op['rule']}** on its {op['chosen_on']}, then applied unchanged "
        "to every test cohort. Tables at the paper's fixed threshold 0.5 follow.",
        f"- Paired tests against **{ref}** on the same images: DeLong's test of correlated AUCs; McNemar's exact "
        "test of sensitivity (positives) and specificity (negatives) at each model's operating point; Holm's "
        "correction across the models compared, per test.",
        "",
        f"![validation AUC per fold]({report['figures']['fold_auc']})",
        "",
        _row(["model", *(f"fold {k}" for k in range(len(report["runs"][0]["fold_aucs"]))), "mean"]),
        _row(["---"] * (len(report["runs"][0]["fold_aucs"]) + 2)),
    ]
    for run in report["runs"]:
        aucs = run["fold_aucs"]
        mean = sum(aucs) / len(aucs) if aucs else float("nan")
        lines.append(_row([run["name"], *(f"{100 * a:.1f}" for a in aucs), f"{100 * mean:.1f}"]))
    for cohort, part in report["cohorts"].items():
        pics = report["figures"]["cohorts"][cohort]
        lines += [
            "",
            f"## {cohort}: {part['n_images']} images ({part['n_positive']} {report['positive_class']}), "
            f"{part['n_patients']} patients",
            "",
            f"### At the operating point ({op['rule']})",
            "",
            *_metrics_table(part, "at_operating_point", with_threshold=True),
            "",
            "### At threshold 0.5 (the paper's)",
            "",
            *_metrics_table(part, "at_0.5", with_threshold=False),
        ]
        if part["paired"]:
            lines += ["", f"### Paired tests against {ref}", "", *_paired_table(part, ref)]
        lines += _fold_stratified_lines(part, ref)
        lines += [
            "",
            f"![ROC {cohort}]({pics['roc']}) ![calibration {cohort}]({pics['calibration']})",
            "",
            f"![confusion {cohort}]({pics['confusion']})",
            "",
            "Expected calibration error (ECE, 10 bins): "
            + ", ".join(f"{name} {100 * m['calibration']['ece']:.1f} %" for name, m in part["models"].items()),
        ]
    return "\n".join(lines) + "\n"
