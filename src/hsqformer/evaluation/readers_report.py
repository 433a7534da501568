"""The ``hsqformer readers`` report folder: report.md with its figures, report.json and reads.csv."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hsqformer.evaluation import figures
from hsqformer.evaluation.readers import ALL_READERS, FORMAT, ReaderStudy, matched_reads_table
from hsqformer.evaluation.statistics import METRIC_LABELS, format_ci, format_p, patient_groups
from hsqformer.files import prepare_report_dir, write_csv, write_json, write_text

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
LABELS = {**METRIC_LABELS, "balanced_accuracy": "Balanced acc."}
# Table 3's columns: (label, metric)
TABLE3 = (("Accuracy", "accuracy"), ("Precision", "ppv"), ("Recall", "sensitivity"), ("F1", "f1"),
          ('"AUC" = balanced accuracy', "balanced_accuracy"))


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty folder unless ``overwrite`` and it holds an earlier readers report."""
    prepare_report_dir(out, overwrite, FORMAT, "a readers report")


def write_report(study: ReaderStudy, report: dict[str, Any], out: Path, seed: int = 0) -> Path:
    """Write the figures, reads.csv, report.json and report.md into ``out``; returns report.md's path."""
    out.mkdir(parents=True, exist_ok=True)
    pictures = {"points": roc_points_figure(study, report, out / "readers_roc.png", seed).name}
    if any(r.scores is not None for r in study.readers):
        pictures["scores"] = reader_curves_figure(study, report, out / "readers_scores_roc.png").name
    report = {**report, "figures": pictures}
    write_csv(out / "reads.csv", matched_reads_table(study, report["operating_point"]["threshold"]))
    write_json(out / "report.json", public_report(report))
    return write_text(out / "report.md", markdown(report))


# --------------------------------------------------------------------------- text


def _pct(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.{digits}f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table3_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Table 3's layout: readers, group averages (mean ± SD over readers), the model; values in %."""
    head = ["reader", "group", "images", *(label for label, _ in TABLE3), "ROC AUC"]
    rows = []
    for r in report["readers"]:
        auc = _pct(r["roc_auc"]["value"]) if "roc_auc" in r else "—"
        rows.append([r["reader"], r["group"], str(r["n_images"]),
                     *(_pct(r["metrics"][m]["value"]) for _, m in TABLE3), auc])
    for g in report["groups"]:
        label = g["group"] if g["group"] == ALL_READERS else f"{g['group']} average"
        cells = []
        for _, m in TABLE3:
            v = g["metrics"][m]
            cells.append(_pct(v["mean"]) + ("" if math.isnan(v["sd"]) else f" ± {_pct(v['sd'])}"))
        rows.append([label, "", f"{len(g['readers'])} readers", *cells, "—"])
    model = report["model"]
    auc = _pct(model["roc_auc"]["value"]) if "roc_auc" in model else "n/a"
    for key in ("at_operating_point", "at_0.5"):
        point = model[key]
        label = f"operating point {point['threshold']:.3f}" if key == "at_operating_point" else "threshold 0.5"
        rows.append([f"model ({label})", "model", str(model["n_images"]),
                     *(_pct(point["metrics"][m]["value"]) for _, m in TABLE3), auc])
    return head, rows


def print_table3(report: dict[str, Any]) -> list[str]:
    """Table 3 as aligned plain-text lines (what the command prints)."""
    head, rows = table3_rows(report)
    head = [h.replace('"AUC" = balanced accuracy', "BalAcc(AUC)") for h in head]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return [fmt(head), *(fmt(r) for r in rows)]


def _reader_ci_table(report: dict[str, Any]) -> list[str]:
    head = ["reader", "group", "images (+/−)", *(LABELS[m] for m in LABELS)]
    lines = [_row(head), _row(["---"] * len(head))]
    for r in report["readers"]:
        cells = [format_ci(r["metrics"][m]["value"], tuple(r["metrics"][m]["ci"])) for m in LABELS]
        counts = f"{r['n_images']} ({r['n_positive']}/{r['n_negative']})"
        lines.append(_row([r["reader"], r["group"], counts, *cells]))
    model = report["model"]["at_operating_point"]
    cells = [format_ci(model["metrics"][m]["value"], tuple(model["metrics"][m]["ci"])) for m in LABELS]
    n = report["model"]
    lines.append(_row([f"model (operating point {model['threshold']:.3f})", "model",
                       f"{n['n_images']} ({n['n_positive']}/{n['n_images'] - n['n_positive']})", *cells]))
    return lines


def _group_table(report: dict[str, Any]) -> list[str]:
    head = ["group", "readers", *(LABELS[m] for m in LABELS)]
    lines = [_row(head), _row(["---"] * len(head))]
    for g in report["groups"]:
        cells = []
        for m in LABELS:
            v = g["metrics"][m]
            sd = "" if math.isnan(v["sd"]) else f" ± {_pct(v['sd'], 1)}"
            cells.append(f"{format_ci(v['mean'], tuple(v['ci']))}{sd}")
        lines.append(_row([g["group"], ", ".join(g["readers"]), *cells]))
    return lines


def _p_is(p: float) -> str:
    text = format_p(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def _p(test: dict[str, Any]) -> str:
    return f"{format_p(test['p'])} ({format_p(test['p_holm'])})"


def _comparison_table(report: dict[str, Any]) -> list[str]:
    head = [
        "reader", "images", "reader sens.", "model sens. (op)", "McNemar p (Holm)", "reader spec.", "model spec. (op)",
        "McNemar p (Holm)", "model spec. at reader's sens.", "McNemar p (Holm)", "model sens. at reader's spec.",
        "McNemar p (Holm)",
    ]
    lines = [_row(head), _row(["---"] * len(head))]
    for c in report["comparisons"]:
        op = c["operating_point"]
        cells = [c["reader"], str(c["n_images"]), _pct(c["reader_sensitivity"], 1), _pct(op["model_sensitivity"], 1),
                 _p(op["sensitivity_test"]), _pct(c["reader_specificity"], 1), _pct(op["model_specificity"], 1),
                 _p(op["specificity_test"])]
        if "at_reader_sensitivity" in c:
            a, b = c["at_reader_sensitivity"], c["at_reader_specificity"]
            cells += [_pct(a["model_specificity"], 1), _p(a["specificity_test"]), _pct(b["model_sensitivity"], 1),
                      _p(b["sensitivity_test"])]
        else:
            cells += ["n/a"] * 4
        lines.append(_row(cells))
    return lines


def _auc_table(report: dict[str, Any]) -> list[str]:
    rows = [c for c in report["comparisons"] if "auc" in c]
    if not rows:
        return []
    lines = [_row(["reader", "reader AUC", "model AUC (same images)", "model − reader", "DeLong p (Holm)"]),
             _row(["---"] * 5)]
    for c in rows:
        a = c["auc"]
        lines.append(_row([c["reader"], _pct(a["reader"], 1), _pct(a["model"], 1), f"{100 * a['difference']:+.1f}",
                           _p(a)]))
    return lines


def _mrmc_lines(result: dict[str, Any], what: str, model_label: str) -> list[str]:
    if "skipped" in result:
        return [f"Not done: {result['skipped']}."]
    vc = result["variance_components"]
    ddf = result["ddf"]
    ddf_text = "∞" if math.isinf(ddf) else f"{ddf:.1f}"
    return [
        f"{result['n_readers']} readers ({', '.join(result['readers'])}) on the {result['n_cases']} images all of "
        f"them read ({result['n_positive']} positive, {result['n_patients']} patients).",
        "",
        _row(["", what, "95 % CI"]),
        _row(["---"] * 3),
        _row(["readers' mean (OR, random readers and cases)", _pct(result["mean_reader_auc"]),
              f"[{_pct(result['mean_reader_auc_ci'][0])}, {_pct(result['mean_reader_auc_ci'][1])}]"]),
        _row([model_label, _pct(result["model_auc"]),
              f"[{_pct(result['model_auc_ci'][0])}, {_pct(result['model_auc_ci'][1])}] (DeLong)"]),
        _row(["readers − model", f"{100 * result['difference']:+.2f}",
              f"[{100 * result['difference_ci'][0]:+.2f}, {100 * result['difference_ci'][1]:+.2f}]"]),
        "",
        f"OR test (random readers, random cases): t = {result['t']:.3f} on {ddf_text} denominator degrees of freedom "
        f"(Hillis 2007), **{_p_is(result['p'])}**. Fixed readers, random cases: "
        f"{_p_is(result['fixed_readers']['p'])}; random readers, fixed cases (t-test of the reader − model "
        f"differences, {result['fixed_cases']['df']} df): {_p_is(result['fixed_cases']['p'])}.",
        f"Variance components: MS(R) = {vc['ms_r']:.3g}, Var = {vc['var_error']:.3g}, Cov2 = {vc['cov2']:.3g} "
        f"(of the reader − model differences, from DeLong), reader variance σ²_R ≈ {vc['sigma2_r']:.3g}.",
    ]


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    cohort = report["cohort"]
    op = report["operating_point"]
    run = report["run"]
    pos = run["positive_class"]
    boot = report["bootstrap"]
    head, rows = table3_rows(report)
    same = (" The cohort is the validation set itself, so the operating point was chosen on these very images."
            if op["same_data"] else "")
    lines = [
        "# Reader study: model vs radiologists",
        "",
        f"Run `{run['name']}` ({run['model']}), cohort **{cohort['name']}**: {cohort['n_images']} images "
        f"({cohort['n_positive']} {pos}), {cohort['n_patients']} patients; {cohort['n_images_read']} images read by at "
        f"least one of {report['reads']['n_readers']} readers ({report['reads']['n_reads']} reads from "
        f"`{report['reads']['file']}`, matched by "
        + ", ".join(f"{how} ({n})" for how, n in report["reads"]["matched_by"].items()) + ").",
        f"Model scores: {cohort['model_scores']}. Operating point: **{op['rule']}** on {op['chosen_on']}, threshold "
        f"{op['threshold']:.3f}.{same}",
        "",
        "How to read this report:",
        "",
        "- Each reader is compared with the model on exactly the images that reader read.",
        "- **\"AUC\" of a binary reader.** A reader who only says benign or malignant has one point on the ROC plane, "
        "(1 − specificity, sensitivity). The area under the two straight lines that join it to (0, 0) and (1, 1) is "
        "(sensitivity + specificity) / 2, the **balanced accuracy**; it is also the Mann–Whitney AUC of the 0/1 calls. "
        "The paper's Table 3 reports this number as the radiologists' \"AUC\", beside the models' full ROC AUC: the "
        "two are not comparable (a single point gives a lower area than any concave ROC curve through it). The "
        "fair comparisons are below: the model at the reader's own sensitivity or specificity, and, when readers give "
        "confidence scores, their ROC AUCs against the model's (MRMC).",
        "- Group rows: the mean over the group's readers ± the SD across readers (Table 3's \"average\" rows); "
        "their 95 % CI comes from a bootstrap of patients with the readers fixed.",
        f"- 95 % CIs: Wilson's score interval for accuracy, sensitivity, specificity, PPV and NPV (images counted "
        f"as independent); a percentile bootstrap of **patients** ({boot['resamples']} resamples, seed {boot['seed']}) "
        "for F1, balanced accuracy and group means; DeLong for ROC AUCs.",
        "- Paired tests on the same images: McNemar's exact test of sensitivity (on the positives) and of "
        "specificity (on the negatives), with Holm's correction across readers for each test. \"At the reader's "
        "sensitivity\" sets the model's threshold on that reader's images to the highest one whose sensitivity "
        "reaches the reader's, and then compares specificities (and vice versa); these thresholds are chosen on "
        "the test images themselves, so they favour the model slightly.",
        "",
        "## Table 3",
        "",
        f"Values in %. Precision = PPV, recall = sensitivity. Model rows: on the {report['model']['n_images']} "
        "images read; the ROC AUC column is the model's full ROC AUC (and a reader's score AUC when scores were given).",
        "",
        _row(head),
        _row(["---"] * len(head)),
        *(_row(r) for r in rows),
        "",
        f"![model ROC and readers]({report['figures']['points']})",
        "",
        "## Readers with 95 % CIs",
        "",
        *_reader_ci_table(report),
        "",
        "## Groups: mean over readers [95 % CI] ± SD across readers",
        "",
        *_group_table(report),
        "",
        "## Model vs each reader (same images)",
        "",
        f"\"op\": the model at its operating point (threshold {op['threshold']:.3f}). Values in %; p-values raw "
        "(Holm across readers).",
        "",
        *_comparison_table(report),
    ]
    auc_lines = _auc_table(report)
    if auc_lines:
        lines += ["", "Readers who gave scores: their ROC AUC against the model's on the same images (DeLong's paired "
                  "test, Holm across readers).", "", *auc_lines]
    mrmc = report["mrmc"]
    lines += [
        "",
        "## Multi-reader multi-case (MRMC) analysis",
        "",
        "Obuchowski–Rockette (Obuchowski & Rockette 1995) analysis of the readers' mean against the model, the "
        "model being one fixed reader read once, as in the single-modality \"standalone CAD vs radiologists\" "
        "analysis of RJafroc (`StCadVsRad`, `1T-RRRC`): for each reader the difference D_j = reader − model; "
        "MS(R) is the variance of the D_j across readers, Var and Cov2 the mean variance and the mean covariance "
        "between readers of the D_j, from DeLong's covariance matrix of all AUCs on the same images; "
        "t = mean D / √((MS(R) + J·max(Cov2, 0)) / J) on Hillis' (2007) denominator degrees of freedom "
        "(MS(R) + J·max(Cov2, 0))² / (MS(R)² / (J − 1)). Only images read by every reader in the analysis are used "
        "(a fully crossed design).",
        "",
        "### Readers' score AUCs vs the model's AUC",
        "",
        *_mrmc_lines(mrmc["scores"], "ROC AUC (%)", "model"),
        "",
        "### Readers' calls vs the model's calls at its operating point (balanced accuracy)",
        "",
        "The same analysis on binary decisions: each reader's balanced accuracy (the paper's \"AUC\") against the "
        "model's balanced accuracy at its operating point, a like-for-like comparison.",
        "",
        *_mrmc_lines(mrmc["calls"], "balanced accuracy (%)", f"model at threshold {op['threshold']:.3f}"),
    ]
    if "scores" in report["figures"]:
        lines += ["", f"![reader ROC curves]({report['figures']['scores']})"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figures


def roc_points_figure(study: ReaderStudy, report: dict[str, Any], path: Path, seed: int = 0) -> Path:
    """Fig. 3: the model's ROC with its 95 % band on the images read; each reader a point (marker per group)."""
    from sklearn.metrics import roc_curve

    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 5.6))
    idx = study.read_index
    truth, scores = study.truth[idx], study.scores[idx]
    fpr, tpr, _ = roc_curve(truth, scores)
    model = report["model"]
    auc = model.get("roc_auc", {"value": math.nan, "ci": (math.nan, math.nan)})
    (line,) = ax.plot(fpr, tpr, color="black", lw=2,
                      label=f"model: AUC {format_ci(auc['value'], tuple(auc['ci']))}")
    groups = patient_groups([study.run.cohorts[study.cohort].patients[j] for j in idx])
    low, high = figures.roc_band(truth, scores, groups, seed)
    ax.fill_between(figures.FPR_GRID, low, high, color="grey", alpha=0.25, lw=0, label="model 95 % band (patients)")
    point = model["at_operating_point"]["metrics"]
    ax.plot(1 - point["specificity"]["value"], point["sensitivity"]["value"], "*", color="black", ms=13,
            label=f"model at its operating point ({model['at_operating_point']['threshold']:.3f})")
    group_names = list(dict.fromkeys(r["group"] for r in report["readers"]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for g, group in enumerate(group_names):
        members = [r for r in report["readers"] if r["group"] == group]
        xs = [1 - r["metrics"]["specificity"]["value"] for r in members]
        ys = [r["metrics"]["sensitivity"]["value"] for r in members]
        ax.plot(xs, ys, MARKERS[g % len(MARKERS)], color=colours[g % len(colours)], ms=8, mec="black", mew=0.6,
                ls="none", label=f"{group} ({len(members)})")
        for x, y, r in zip(xs, ys, members, strict=True):
            ax.annotate(r["reader"], (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    ax.set_title(f"{study.cohort}: model ROC ({len(idx)} images read) and readers", fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    line.set_zorder(3)
    return figures.save_png(fig, path)


def reader_curves_figure(study: ReaderStudy, report: dict[str, Any], path: Path) -> Path:
    """Empirical ROC curves of the readers who gave scores (each on its images) and the model's."""
    from sklearn.metrics import roc_curve

    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 5.6))
    idx = study.read_index
    fpr, tpr, _ = roc_curve(study.truth[idx], study.scores[idx])
    auc = report["model"].get("roc_auc", {"value": math.nan})["value"]
    ax.plot(fpr, tpr, color="black", lw=2.2, label=f"model: AUC {_pct(auc, 1)}")
    by_name = {r["reader"]: r for r in report["readers"]}
    group_names = list(dict.fromkeys(r.group for r in study.readers))
    styles = ("-", "--", "-.", ":")
    for reader in study.readers:
        if reader.scores is None:
            continue
        t = study.truth[reader.index]
        if t.all() or not t.any():
            continue
        fpr, tpr, _ = roc_curve(t, reader.scores)
        g = group_names.index(reader.group)
        value = by_name[reader.name].get("roc_auc", {"value": math.nan})["value"]
        (line,) = ax.plot(fpr, tpr, styles[g % len(styles)], lw=1.2, marker=MARKERS[g % len(MARKERS)], ms=3,
                          label=f"{reader.name} ({reader.group}): AUC {_pct(value, 1)}")
        point = by_name[reader.name]["metrics"]
        ax.plot(1 - point["specificity"]["value"], point["sensitivity"]["value"], MARKERS[g % len(MARKERS)],
                color=line.get_color(), ms=8, mec="black", mew=0.6)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    ax.set_title(f"{study.cohort}: reader ROC curves from their scores (big marks: their calls)", fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    return figures.save_png(fig, path)


def public_report(report: dict[str, Any]) -> dict[str, Any]:
    """The report without values JSON cannot hold (tuples become lists on writing; infinities become strings)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        return value

    return clean(report)
