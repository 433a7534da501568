"""Reader study: radiologists' reads against a finished ``hsqformer cv`` run on the same images.

This is the paper's Table 3 and Fig. 3 (six radiologists, each giving a benign
or malignant call on every image of the high-risk test cohort), done so that
the comparison is paired and honest about uncertainty:

- Per reader: accuracy, sensitivity (recall), specificity, PPV (precision),
  NPV with Wilson 95 % intervals; F1 and balanced accuracy with a percentile
  bootstrap that resamples *patients*. For a reader who gives only binary
  calls the paper's "AUC" is the balanced accuracy (sensitivity +
  specificity) / 2: the area under the ROC "curve" through the reader's single
  point, which is also the Mann-Whitney AUC of the 0/1 calls.
- Per group (e.g. senior, junior) and for all readers: the mean over the
  group's readers with the sample SD across readers (Table 3's "average" rows)
  and a patient-bootstrap 95 % CI of the mean (readers fixed, cases random).
- Model vs each reader on exactly the images that reader read: the model at
  the run's operating point (Youden's J or a target sensitivity, chosen on the
  run's pooled out-of-fold validation scores), the model at the reader's own
  sensitivity (its specificity there) and at the reader's own specificity (its
  sensitivity there); McNemar's exact test on the positives (sensitivity) and
  on the negatives (specificity); Holm's correction across readers per test.
- Multi-reader multi-case (MRMC): the readers' mean AUC against the model's
  AUC by the Obuchowski-Rockette (OR) model with DeLong covariances and
  Hillis' denominator degrees of freedom, the model being one fixed "reader"
  read once (:func:`or_mrmc`).
"""

from __future__ import annotations

import math
import os
import posixpath
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import special

from hsqformer.errors import HSQformerError
from hsqformer.evaluation import statistics as st
from hsqformer.evaluation.compare import PAPER_THRESHOLD, VALIDATION, RunScores, operating_threshold

FORMAT = "hsqformer-readers/1"
REQUIRED_COLUMNS = ("reader", "group", "image", "call")
ALPHA = 0.05
METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy")
WILSON_METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv")
ALL_READERS = "all readers"
MIN_MRMC_READERS = 3


@dataclass
class Reader:
    """One reader's reads, as indices into the cohort's images (in the order of the reads file)."""

    name: str
    group: str
    index: np.ndarray  # cohort image indices
    positive: np.ndarray  # bool: the call is the positive class
    calls: list[str]
    rows: list[int]  # 1-based data rows of the reads file (header not counted)
    scores: np.ndarray | None = None


@dataclass
class ReaderStudy:
    """A cohort of a run, its model scores, and the readers' reads on it."""

    run: RunScores
    cohort: str
    reads_path: str
    truth: np.ndarray
    scores: np.ndarray
    groups: np.ndarray  # patient group per cohort image
    readers: list[Reader]
    matched_by: dict[str, int] = field(default_factory=dict)

    @property
    def images(self) -> list[str]:
        return self.run.cohorts[self.cohort].images

    @property
    def read_index(self) -> np.ndarray:
        """Cohort images read by at least one reader, in cohort order."""
        return np.unique(np.concatenate([r.index for r in self.readers]))


# --------------------------------------------------------------------------- reading and matching


def _where(row: int, path: str) -> str:
    return f"row {row} of {path}"


class _ImageIndex:
    """Resolves a read's ``image`` field to cohort images.

    In this order: (1) the image path exactly as stored in the run's
    predictions.csv; (2) the path relative to the folder that holds all of the
    cohort's images (``/`` or ``\\`` separators); (3) the bare file name, when
    exactly one cohort image has it; (4) a patient id, which stands for every
    image of that patient in the cohort.
    """

    def __init__(self, images: Sequence[str], patients: Sequence[str]):
        self.exact: dict[str, int] = {}
        for i, image in enumerate(images):
            self.exact.setdefault(image, i)
            self.exact.setdefault(os.path.normpath(image), i)
        self.common = _common_folder(images)
        self.relative: dict[str, int] = {}
        if self.common is not None:
            for i, image in enumerate(images):
                rel = os.path.relpath(os.path.normpath(image), self.common)
                self.relative.setdefault(rel.replace(os.sep, "/"), i)
        self.names: dict[str, list[int]] = {}
        for i, image in enumerate(images):
            self.names.setdefault(_basename(image), []).append(i)
        self.patients: dict[str, list[int]] = {}
        for i, patient in enumerate(patients):
            if patient not in ("", None):
                self.patients.setdefault(str(patient), []).append(i)
        self.images = list(images)

    def resolve(self, key: str) -> tuple[str, list[int]]:
        """(how it matched, cohort indices); ('unknown', []) or ('ambiguous', candidates)."""
        if key in self.exact:
            return "path", [self.exact[key]]
        normal = os.path.normpath(key)
        if normal in self.exact:
            return "path", [self.exact[normal]]
        posix = posixpath.normpath(key.replace("\\", "/"))
        if not posix.startswith("/") and posix in self.relative:
            return "relative path", [self.relative[posix]]
        if "/" not in key and "\\" not in key and key in self.names:
            found = self.names[key]
            return ("file name", found) if len(found) == 1 else ("ambiguous", found)
        if key in self.patients:
            return "patient id", list(self.patients[key])
        return "unknown", []


def _basename(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _common_folder(images: Sequence[str]) -> str | None:
    parents = [os.path.dirname(os.path.normpath(image)) for image in images]
    try:
        return os.path.commonpath(parents) if parents else None
    except ValueError:  # absolute and relative paths mixed, or different drives
        return None


def read_reads_table(path: str | Path) -> pd.DataFrame:
    """The reads file as strings, with its columns checked; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise HSQformerError(f"reads file not found: {path}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        reason = " ".join(str(err).split()) or err.__class__.__name__
        raise HSQformerError(f"cannot read reads file {path}: {reason}") from None
    table.columns = [str(c).strip() for c in table.columns]
    for column in REQUIRED_COLUMNS:
        if column not in table.columns:
            raise HSQformerError(
                f"reads file {path} has no column '{column}' (expected columns reader,group,image,call[,score]; "
                f"found {','.join(table.columns)})"
            )
    if len(table) == 0:
        raise HSQformerError(f"reads file {path} has no reads")
    for column in table.columns:
        table[column] = table[column].astype(str).str.strip()
    return table


def load_reads(path: str | Path, run: RunScores, cohort: str) -> ReaderStudy:
    """Check the reads file against the run's cohort and resolve every read to a cohort image."""
    if cohort not in run.cohorts:
        raise HSQformerError(f"run {run.path} has no cohort '{cohort}'; it has {', '.join(run.cohorts)}")
    table = read_reads_table(path)
    where_file = str(path)
    part = run.cohorts[cohort]
    truth = np.array([label == run.positive_class for label in part.labels])
    if truth.all() or not truth.any():
        raise HSQformerError(f"cohort '{cohort}' of run {run.path} has images of one class only")
    has_scores = "score" in table.columns
    rows = np.arange(1, len(table) + 1)

    for column in REQUIRED_COLUMNS:
        empty = np.flatnonzero(table[column].to_numpy() == "")
        if len(empty):
            raise HSQformerError(f"empty '{column}' in {_where(int(rows[empty[0]]), where_file)}")

    group_of: dict[str, tuple[str, int]] = {}
    for row, reader, group in zip(rows, table["reader"], table["group"], strict=True):
        first = group_of.setdefault(reader, (group, int(row)))
        if first[0] != group:
            raise HSQformerError(
                f"reader '{reader}' has group '{first[0]}' in row {first[1]} but '{group}' in row {row} of {where_file}"
            )

    classes = list(run.classes)
    for row, call in zip(rows, table["call"], strict=True):
        if call not in classes:
            raise HSQformerError(
                f"call '{call}' in {_where(int(row), where_file)} is not a class of run {run.path} "
                f"(expected one of {', '.join(classes)})"
            )

    values = np.full(len(table), np.nan)
    if has_scores:
        for i, (row, text) in enumerate(zip(rows, table["score"], strict=True)):
            if text == "":
                continue
            try:
                values[i] = float(text)
            except ValueError:
                raise HSQformerError(f"score '{text}' in {_where(int(row), where_file)} is not a number") from None
            if not math.isfinite(values[i]):
                raise HSQformerError(f"score '{text}' in {_where(int(row), where_file)} is not a finite number")

    index = _ImageIndex(part.images, part.patients)
    resolved: list[list[int]] = []
    unknown: list[int] = []
    matched_by: dict[str, int] = {}
    for i, (row, key) in enumerate(zip(rows, table["image"], strict=True)):
        how, found = index.resolve(key)
        if how == "ambiguous":
            examples = ", ".join(part.images[j] for j in found[:2])
            hint = f"; give its path relative to {index.common}" if index.common else "; give its full path"
            raise HSQformerError(
                f"image '{key}' in {_where(int(row), where_file)} matches {len(found)} images of cohort "
                f"'{cohort}' ({examples}){hint}"
            )
        if how == "unknown":
            unknown.append(i)
        else:
            matched_by[how] = matched_by.get(how, 0) + 1
        resolved.append(found)
    if unknown:
        first = unknown[0]
        raise HSQformerError(
            f"{len(unknown)} read(s) in {where_file} name images that are not in cohort '{cohort}' of run {run.path}; "
            f"the first: '{table['image'].iloc[first]}' ({_where(int(rows[first]), where_file)})"
        )

    readers: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[str, int], int] = {}
    for i, (row, reader) in enumerate(zip(rows, table["reader"], strict=True)):
        entry = readers.setdefault(reader, {"index": [], "calls": [], "rows": [], "scores": []})
        for j in resolved[i]:
            earlier = seen.setdefault((reader, j), int(row))
            if earlier != row:
                raise HSQformerError(
                    f"duplicate read: reader '{reader}' reads image {part.images[j]} in row {earlier} and again in "
                    f"row {row} of {where_file}"
                )
            entry["index"].append(j)
            entry["calls"].append(table["call"].iloc[i])
            entry["rows"].append(int(row))
            entry["scores"].append(values[i])

    built = []
    positive = run.positive_class
    for name, entry in readers.items():
        scores = np.array(entry["scores"], dtype=np.float64)
        given = ~np.isnan(scores)
        if given.any() and not given.all():
            with_score = entry["rows"][int(np.flatnonzero(given)[0])]
            without = entry["rows"][int(np.flatnonzero(~given)[0])]
            raise HSQformerError(
                f"reader '{name}' gives a score in row {with_score} but none in row {without} of {where_file}; "
                "give a score with every read of a reader or with none"
            )
        built.append(
            Reader(
                name=name,
                group=group_of[name][0],
                index=np.array(entry["index"], dtype=np.int64),
                positive=np.array([c == positive for c in entry["calls"]]),
                calls=list(entry["calls"]),
                rows=list(entry["rows"]),
                scores=scores if given.all() else None,
            )
        )
    return ReaderStudy(
        run=run,
        cohort=cohort,
        reads_path=str(path),
        truth=truth,
        scores=np.asarray(part.scores, dtype=np.float64),
        groups=st.patient_groups(part.patients),
        readers=built,
        matched_by=matched_by,
    )


# --------------------------------------------------------------------------- statistics


def specificity_threshold(truth: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The lowest threshold whose specificity reaches ``target`` (so sensitivity is as high as it can be).

    Predict positive when score >= threshold. The threshold lies just above the
    ``ceil(target * negatives)``-th smallest negative score.
    """
    truth = np.asarray(truth, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    negatives = np.sort(scores[~truth])
    if len(negatives) == 0:
        raise ValueError("no negative cases to reach a specificity with")
    needed = math.ceil(target * len(negatives) - 1e-9)
    if needed <= 0:
        return float(scores.min())
    return float(np.nextafter(negatives[min(needed, len(negatives)) - 1], np.inf))


def confusion(truth: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    totals = st.confusion_counts(truth, predicted).sum(axis=0)
    tp, fp, tn, fn = (int(v) for v in totals)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def point_values(c: dict[str, int]) -> dict[str, float]:
    """The metrics of one confusion matrix (NaN where undefined)."""
    values = st.count_metrics(np.array([c["tp"], c["fp"], c["tn"], c["fn"]], dtype=np.float64))
    out = {name: float(values[name]) for name in st.COUNT_METRICS}
    out["balanced_accuracy"] = (out["sensitivity"] + out["specificity"]) / 2
    return out


def wilson_intervals(c: dict[str, int]) -> dict[str, tuple[float, float]]:
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    pairs = {
        "accuracy": (tp + tn, tp + fp + tn + fn),
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "ppv": (tp, tp + fp),
        "npv": (tn, tn + fn),
    }
    return {name: st.wilson(k, n) for name, (k, n) in pairs.items()}


def _bootstrap_counts(per_patient: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Totals of ``per_patient`` (G, K) over patients resampled with replacement: (n_resamples, K)."""
    n_groups = per_patient.shape[0]
    rng = np.random.default_rng(seed)
    batch = max(1, min(n_resamples, 4_000_000 // max(n_groups, 1)))
    out = []
    done = 0
    while done < n_resamples:
        b = min(batch, n_resamples - done)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        weights = np.bincount((draws + n_groups * np.arange(b)[:, None]).ravel(), minlength=b * n_groups)
        out.append(weights.reshape(b, n_groups).astype(np.float64) @ per_patient)
        done += b
    return np.concatenate(out, axis=0)


def _metric_arrays(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of (..., 4) tp/fp/tn/fn totals, balanced accuracy included."""
    values = st.count_metrics(counts)
    values["balanced_accuracy"] = (values["sensitivity"] + values["specificity"]) / 2
    return values


def _percentile_ci(samples: np.ndarray, confidence: float = st.CONFIDENCE) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if len(samples) < 10:
        return math.nan, math.nan
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))


def _mcnemar(model_correct: np.ndarray, reader_correct: np.ndarray) -> dict[str, Any]:
    only_model, only_reader, p = st.mcnemar(model_correct, reader_correct)
    return {"model_only_correct": only_model, "reader_only_correct": only_reader, "p": p}


def or_mrmc(
    truth: np.ndarray, reader_scores: np.ndarray, model_scores: np.ndarray, confidence: float = st.CONFIDENCE
) -> dict[str, Any]:
    """Obuchowski-Rockette MRMC comparison of J readers' mean AUC with a model's AUC on the same cases.

    The model is one fixed reader read once, as in the "standalone CAD vs
    radiologists" single-modality analysis (RJafroc ``StCadVsRad``, method
    ``1T-RRRC``; Hillis 2007, section 5.3), with the error (co)variances taken
    from DeLong's covariance matrix instead of the jackknife:

    - D_j = AUC_j - AUC_model for reader j; D = mean_j D_j.
    - OR model for the single "modality" D_j: D_j = mu + R_j + e_j, readers
      random; the e_j have variance Var and pairwise covariance Cov2 (same
      cases, different readers), here estimated by DeLong: with S the DeLong
      covariance of (AUC_model, AUC_1..J), Cov(D_i, D_j) = S_ij - S_i0 - S_0j
      + S_00; Var is the mean of its diagonal, Cov2 the mean of its
      off-diagonal terms (Obuchowski & Rockette 1995).
    - MS(R) = sum_j (D_j - D)^2 / (J - 1) (equal to the sample variance of
      the reader AUCs, since the model's AUC is common to all D_j).
    - Random readers and random cases: t = D / sqrt(MS_den / J) with
      MS_den = MS(R) + J * max(Cov2, 0), on Hillis' (2007) denominator
      degrees of freedom ddf_H = MS_den^2 / (MS(R)^2 / (J - 1)); CI of D is
      D -/+ t_{ddf_H} sqrt(MS_den / J).
    - The readers' mean AUC gets the same single-test OR interval with the
      reader AUCs' own Var and Cov2 (Hillis 2007); the model's AUC its DeLong CI.
    - Also given: fixed readers, random cases (z = D / sqrt(mean of Cov(D))),
      and random readers, fixed cases (one-sample t-test of the D_j, J - 1 df).
    """
    truth = np.asarray(truth, dtype=bool)
    reader_scores = np.atleast_2d(np.asarray(reader_scores, dtype=np.float64))
    n_readers = reader_scores.shape[0]
    if n_readers < 2:
        raise ValueError("the OR analysis needs at least two readers")
    dl = st.delong(truth, np.vstack([np.asarray(model_scores, dtype=np.float64)[None, :], reader_scores]))
    s = dl.covariance
    aucs = dl.aucs[1:]
    model_auc = float(dl.aucs[0])
    diffs = aucs - model_auc
    a = np.hstack([-np.ones((n_readers, 1)), np.eye(n_readers)])
    cov_d = a @ s @ a.T
    off = ~np.eye(n_readers, dtype=bool)
    var_d, cov2_d = float(np.mean(np.diag(cov_d))), float(np.mean(cov_d[off]))
    s_r = s[1:, 1:]
    var_r, cov2_r = float(np.mean(np.diag(s_r))), float(np.mean(s_r[off]))
    msr = float(np.var(aucs, ddof=1))
    j = n_readers
    mean_d = float(np.mean(diffs))

    two_sided = 0.5 + confidence / 2
    zq = float(special.ndtri(two_sided))

    def t_quantile(df: float) -> float:
        return float(special.stdtrit(df, two_sided)) if math.isfinite(df) else zq

    def t_p(statistic: float, df: float) -> float:
        if math.isinf(statistic):
            return 0.0
        tail = special.stdtr(df, -abs(statistic)) if math.isfinite(df) else special.ndtr(-abs(statistic))
        return float(min(1.0, 2 * tail))

    def single_test(mean: float, cov2: float) -> dict[str, Any]:
        den = msr + max(j * cov2, 0.0)
        se = math.sqrt(den / j)
        ddf = den**2 / (msr**2 / (j - 1)) if msr > 0 else math.inf
        if se == 0:
            t_stat = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        else:
            t_stat = mean / se
        q = t_quantile(ddf)
        return {"ms_den": den, "se": se, "ddf": ddf, "t": t_stat, "p": t_p(t_stat, ddf) if t_stat else 1.0,
                "ci": (mean - q * se, mean + q * se)}

    rrrc = single_test(mean_d, cov2_d)
    readers_mean = single_test(float(np.mean(aucs)), cov2_r)
    var_fixed = max(float(np.sum(cov_d)) / j**2, 0.0)
    se_fixed = math.sqrt(var_fixed)
    z = mean_d / se_fixed if se_fixed > 0 else (0.0 if mean_d == 0 else math.copysign(math.inf, mean_d))
    if msr > 0:
        se_rrfc = math.sqrt(msr / j)
        t_rrfc = mean_d / se_rrfc
        p_rrfc = t_p(t_rrfc, j - 1)
        q_rrfc = t_quantile(j - 1)
        ci_rrfc = (mean_d - q_rrfc * se_rrfc, mean_d + q_rrfc * se_rrfc)
    else:
        t_rrfc, p_rrfc, ci_rrfc = math.nan, math.nan, (math.nan, math.nan)
    model_se = math.sqrt(max(float(s[0, 0]), 0.0))
    return {
        "n_readers": j,
        "n_cases": int(len(truth)),
        "n_positive": int(truth.sum()),
        "reader_aucs": [float(v) for v in aucs],
        "reader_auc_variances": [float(v) for v in np.diag(s_r)],
        "mean_reader_auc": float(np.mean(aucs)),
        "mean_reader_auc_ci": readers_mean["ci"],
        "mean_reader_auc_ddf": readers_mean["ddf"],
        "model_auc": model_auc,
        "model_auc_ci": (max(0.0, model_auc - zq * model_se), min(1.0, model_auc + zq * model_se)),
        "difference": mean_d,  # readers' mean AUC minus the model's
        "difference_ci": rrrc["ci"],
        "t": rrrc["t"],
        "ddf": rrrc["ddf"],
        "p": rrrc["p"],
        "variance_components": {
            "ms_r": msr,
            "var_error": var_d,
            "cov2": cov2_d,
            "ms_den": rrrc["ms_den"],
            "reader_var_error": var_r,
            "reader_cov2": cov2_r,
            "sigma2_r": max(msr - var_d + cov2_d, 0.0),
        },
        "fixed_readers": {"z": z, "p": t_p(z, math.inf) if z else 1.0,
                          "ci": (mean_d - zq * se_fixed, mean_d + zq * se_fixed)},
        "fixed_cases": {"t": t_rrfc, "df": j - 1, "p": p_rrfc, "ci": ci_rrfc},
    }


# --------------------------------------------------------------------------- the analysis


def analyse(
    study: ReaderStudy,
    *,
    target_sensitivity: float | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the report shows, as plain data (see the module docstring)."""
    run = study.run
    val = run.cohorts[VALIDATION]
    val_truth = np.array([label == run.positive_class for label in val.labels])
    threshold = operating_threshold(val_truth, val.scores, target_sensitivity)
    truth, scores, groups = study.truth, study.scores, study.groups
    model_positive = scores >= threshold
    n_groups = int(groups.max()) + 1

    # per reader: point values, Wilson CIs, and per-patient counts for the bootstrap
    per_patient = np.zeros((n_groups, 4 * len(study.readers)))
    readers_out = []
    for r, reader in enumerate(study.readers):
        t = truth[reader.index]
        c = confusion(t, reader.positive)
        np.add.at(per_patient[:, 4 * r: 4 * r + 4], groups[reader.index], st.confusion_counts(t, reader.positive))
        values = point_values(c)
        wilson = wilson_intervals(c)
        entry: dict[str, Any] = {
            "reader": reader.name,
            "group": reader.group,
            "n_images": int(len(t)),
            "n_positive": int(t.sum()),
            "n_negative": int((~t).sum()),
            "n_patients": int(len(np.unique(groups[reader.index]))),
            "confusion": c,
            "metrics": {
                name: {"value": values[name], "ci": wilson.get(name),
                       "ci_method": "Wilson" if name in wilson else "patient bootstrap"}
                for name in METRICS
            },
            "has_scores": reader.scores is not None,
        }
        if reader.scores is not None and t.any() and (~t).any():
            dl = st.delong(t, reader.scores)
            entry["roc_auc"] = {"value": float(dl.aucs[0]), "ci": dl.ci(0)}
        readers_out.append(entry)

    boot = _bootstrap_counts(per_patient, n_resamples, seed).reshape(n_resamples, len(study.readers), 4)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot_metrics = _metric_arrays(boot)  # each (B, R)
    for r, entry in enumerate(readers_out):
        for name in ("f1", "balanced_accuracy"):
            entry["metrics"][name]["ci"] = _percentile_ci(boot_metrics[name][:, r])

    groups_out = _group_summaries(study, readers_out, boot_metrics)
    model_out = _model_summary(study, threshold, n_resamples, seed)
    comparisons = _comparisons(study, model_positive)
    mrmc = _mrmc(study, model_positive)
    rule = "Youden's J" if target_sensitivity is None else f"sensitivity >= {target_sensitivity:g}"
    return {
        "format": FORMAT,
        "run": {"path": run.path, "name": run.name, "model": run.model, "classes": run.classes,
                "positive_class": run.positive_class},
        "cohort": {
            "name": study.cohort,
            "model_scores": "pooled out-of-fold validation scores (each image scored by the fold model that did "
            "not train on it)" if study.cohort == VALIDATION else f"the ensemble (mean) of the run's "
            f"{len(run.fold_aucs)} fold models",
            "n_images": int(len(truth)),
            "n_positive": int(truth.sum()),
            "n_patients": n_groups,
            "n_images_read": int(len(study.read_index)),
        },
        "reads": {
            "file": study.reads_path,
            "n_reads": int(sum(len(r.index) for r in study.readers)),
            "n_readers": len(study.readers),
            "matched_by": study.matched_by,
        },
        "operating_point": {
            "rule": rule,
            "chosen_on": "the run's pooled out-of-fold validation predictions",
            "threshold": float(threshold),
            "same_data": study.cohort == VALIDATION,
        },
        "confidence": st.CONFIDENCE,
        "bootstrap": {"resamples": n_resamples, "seed": seed, "unit": "patient", "method": "percentile"},
        "readers": readers_out,
        "groups": groups_out,
        "model": model_out,
        "comparisons": comparisons,
        "mrmc": mrmc,
    }


def _group_summaries(study: ReaderStudy, readers_out: list[dict], boot_metrics: dict[str, np.ndarray]) -> list[dict]:
    names = list(dict.fromkeys(r.group for r in study.readers))
    members = {g: [i for i, r in enumerate(study.readers) if r.group == g] for g in names}
    if len(names) > 1:
        members[ALL_READERS] = list(range(len(study.readers)))
    out = []
    for group, who in members.items():
        metrics = {}
        for name in METRICS:
            values = np.array([readers_out[i]["metrics"][name]["value"] for i in who], dtype=np.float64)
            with warnings.catch_warnings():  # resamples in which no reader of the group has the metric defined
                warnings.simplefilter("ignore", RuntimeWarning)
                boot = np.nanmean(boot_metrics[name][:, who], axis=1)
            metrics[name] = {
                "mean": float(np.mean(values)),
                "sd": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
                "ci": _percentile_ci(boot),
            }
        out.append({"group": group, "readers": [study.readers[i].name for i in who], "metrics": metrics})
    return out


def _model_summary(study: ReaderStudy, threshold: float, n_resamples: int, seed: int) -> dict[str, Any]:
    """The model on the images read by at least one reader, at the operating point and at 0.5."""
    idx = study.read_index
    t, s = study.truth[idx], study.scores[idx]
    out: dict[str, Any] = {"n_images": int(len(idx)), "n_positive": int(t.sum())}
    if t.any() and (~t).any():
        dl = st.delong(t, s)
        out["roc_auc"] = {"value": float(dl.aucs[0]), "ci": dl.ci(0)}
    groups = study.groups[idx]
    for key, thr in (("at_operating_point", threshold), ("at_0.5", PAPER_THRESHOLD)):
        predicted = s >= thr
        c = confusion(t, predicted)
        values = point_values(c)
        wilson = wilson_intervals(c)
        per_patient = np.zeros((int(study.groups.max()) + 1, 4))
        np.add.at(per_patient, groups, st.confusion_counts(t, predicted))
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = _metric_arrays(_bootstrap_counts(per_patient, n_resamples, seed))
        out[key] = {
            "threshold": float(thr),
            "confusion": c,
            "metrics": {
                name: {"value": values[name], "ci": wilson[name] if name in wilson else _percentile_ci(boot[name]),
                       "ci_method": "Wilson" if name in wilson else "patient bootstrap"}
                for name in METRICS
            },
        }
    return out


def _comparisons(study: ReaderStudy, model_positive: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for reader in study.readers:
        t = study.truth[reader.index]
        s = study.scores[reader.index]
        m = model_positive[reader.index]
        r = reader.positive
        rc = point_values(confusion(t, r))
        mc = point_values(confusion(t, m))
        row: dict[str, Any] = {
            "reader": reader.name,
            "group": reader.group,
            "n_images": int(len(t)),
            "n_positive": int(t.sum()),
            "reader_sensitivity": rc["sensitivity"],
            "reader_specificity": rc["specificity"],
            "operating_point": {
                "model_sensitivity": mc["sensitivity"],
                "model_specificity": mc["specificity"],
                "sensitivity_test": _mcnemar(m[t], r[t]),
                "specificity_test": _mcnemar(~m[~t], ~r[~t]),
            },
        }
        if t.any() and (~t).any():
            thr = st.sensitivity_threshold(t, s, rc["sensitivity"])
            at = s >= thr
            v = point_values(confusion(t, at))
            row["at_reader_sensitivity"] = {
                "threshold": float(thr),
                "model_sensitivity": v["sensitivity"],
                "model_specificity": v["specificity"],
                "specificity_test": _mcnemar(~at[~t], ~r[~t]),
            }
            thr = specificity_threshold(t, s, rc["specificity"])
            at = s >= thr
            v = point_values(confusion(t, at))
            row["at_reader_specificity"] = {
                "threshold": float(thr),
                "model_sensitivity": v["sensitivity"],
                "model_specificity": v["specificity"],
                "sensitivity_test": _mcnemar(at[t], r[t]),
            }
            if reader.scores is not None:
                dl = st.delong(t, np.vstack([s, reader.scores]))
                z, p = dl.test(0, 1)
                row["auc"] = {"model": float(dl.aucs[0]), "reader": float(dl.aucs[1]),
                              "difference": float(dl.aucs[0] - dl.aucs[1]), "delong_z": z, "p": p}
        rows.append(row)
    tests = [
        ("operating_point", "sensitivity_test"),
        ("operating_point", "specificity_test"),
        ("at_reader_sensitivity", "specificity_test"),
        ("at_reader_specificity", "sensitivity_test"),
        ("auc", None),
    ]
    for section, key in tests:
        holders = [row[section] if key is None else row[section][key] for row in rows if section in row]
        adjusted = st.holm([h["p"] for h in holders])
        for holder, value in zip(holders, adjusted, strict=True):
            holder["p_holm"] = value
            holder["significant"] = bool(value < ALPHA)
    return rows


def _common_cases(readers: Sequence[Reader]) -> np.ndarray:
    common = readers[0].index
    for reader in readers[1:]:
        common = np.intersect1d(common, reader.index)
    return np.sort(common)


def _values_on(reader: Reader, cases: np.ndarray, values: np.ndarray) -> np.ndarray:
    where = {int(j): k for k, j in enumerate(reader.index)}
    return values[[where[int(j)] for j in cases]]


def _mrmc(study: ReaderStudy, model_positive: np.ndarray) -> dict[str, Any]:
    """The OR analysis twice: readers' score AUCs vs the model's AUC; readers' calls vs the model's calls."""
    out: dict[str, Any] = {}
    scoring = [r for r in study.readers if r.scores is not None]
    out["scores"] = _mrmc_one(
        study, scoring, lambda r, cases: _values_on(r, cases, r.scores), study.scores,
        f"needs at least {MIN_MRMC_READERS} readers with scores ({len(scoring)} given)",
    )
    out["calls"] = _mrmc_one(
        study, study.readers, lambda r, cases: _values_on(r, cases, r.positive.astype(np.float64)),
        model_positive.astype(np.float64),
        f"needs at least {MIN_MRMC_READERS} readers ({len(study.readers)} given)",
    )
    return out


def _mrmc_one(study, readers, reader_values, model_values, too_few: str) -> dict[str, Any]:
    if len(readers) < MIN_MRMC_READERS:
        return {"skipped": too_few}
    cases = _common_cases(readers)
    t = study.truth[cases]
    if t.sum() < 2 or (~t).sum() < 2:
        return {"skipped": f"the images read by all {len(readers)} readers ({len(cases)}) hold fewer than two "
                f"images of a class"}
    matrix = np.vstack([reader_values(r, cases) for r in readers])
    result = or_mrmc(t, matrix, model_values[cases])
    result["readers"] = [r.name for r in readers]
    result["n_patients"] = int(len(np.unique(study.groups[cases])))
    return result


def matched_reads_table(study: ReaderStudy, threshold: float) -> pd.DataFrame:
    """One row per read: the resolved image, its truth, the reader's call and score, the model's score and call."""
    part = study.run.cohorts[study.cohort]
    frames = []
    for reader in study.readers:
        frames.append(pd.DataFrame({
            "reader": reader.name,
            "group": reader.group,
            "row": reader.rows,
            "image": [part.images[j] for j in reader.index],
            "patient_id": [part.patients[j] for j in reader.index],
            "label": [part.labels[j] for j in reader.index],
            "call": reader.calls,
            "score": reader.scores if reader.scores is not None else np.nan,
            "model_score": study.scores[reader.index],
            "model_call_positive": study.scores[reader.index] >= threshold,
        }))
    return pd.concat(frames, ignore_index=True)
