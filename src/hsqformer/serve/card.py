"""The model card of a finished cv run, and the operating point at which the app decides.

Everything comes from the run folder (run.json, metrics.json, predictions.csv, config.yaml,
versions.json), so the card describes exactly the models that are served. The operating point is
the one ``hsqformer compare`` uses: Youden's J on the pooled out-of-fold validation predictions.
It is applied unchanged to the fold ensemble's probability of an uploaded image, as compare applies
it to the ensemble's probabilities on the test cohorts. Per cohort the card gives the AUC with
DeLong's 95 % CI, and sensitivity and specificity at the operating point with Wilson's 95 % CIs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hsqformer.errors import HSQformerError
from hsqformer.evaluation import statistics as st
from hsqformer.evaluation.compare import VALIDATION, CohortScores, load_run, operating_threshold
from hsqformer.training.run_folder import CONFIG_FILE, VERSIONS_FILE, read_run

OPERATING_RULE = "Youden's J on the pooled out-of-fold validation predictions"

#: Decimals of the probabilities and threshold shown: enough to compare with ``hsqformer predict``'s CSV.
PROBABILITY_DIGITS = 6


@dataclass(frozen=True)
class Proportion:
    """A proportion (sensitivity, specificity) with its Wilson 95 % CI and its counts."""

    successes: int
    trials: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.successes / self.trials if self.trials else math.nan

    def text(self) -> str:
        """``50.0 % [29.9, 70.1] (10/20)``; ``n/a`` without cases."""
        if not self.trials:
            return "n/a"
        percent = f"{100 * self.value:.1f} % [{100 * self.low:.1f}, {100 * self.high:.1f}]"
        return f"{percent} ({self.successes}/{self.trials})"


@dataclass(frozen=True)
class CohortCard:
    """How the run's models did on one cohort at the operating point."""

    name: str
    scored_by: str  # "out-of-fold" (validation) or "fold ensemble" (test cohorts)
    n_images: int
    n_positive: int
    n_patients: int
    auc: float  # nan when the cohort has images of one class only
    auc_ci: tuple[float, float]
    sensitivity: Proportion
    specificity: Proportion


@dataclass(frozen=True)
class ModelCard:
    """What a user of the app needs to know about the served models; ``cohorts[0]`` is the validation."""

    run_name: str
    model: str
    classes: list[str]
    positive_class: str
    threshold: float
    training_data: str
    n_folds: int
    img_size: int | None
    epochs: int | None
    cohorts: list[CohortCard]
    trained_with: str  # the hsqformer version that trained the run
    version: str  # the hsqformer version serving it
    started: str

    @property
    def validation(self) -> CohortCard:
        return self.cohorts[0]

    @property
    def negative_label(self) -> str:
        """The other class of a binary run, else ``not <positive>``."""
        others = [c for c in self.classes if c != self.positive_class]
        return others[0] if len(others) == 1 else f"not {self.positive_class}"

    def is_positive(self, probability: float) -> bool:
        """The decision at the operating point (positive when the probability reaches the threshold)."""
        return probability >= self.threshold

    def decision(self, probability: float) -> str:
        return self.positive_class if self.is_positive(probability) else self.negative_label

    def operating_point_text(self) -> str:
        """One line: the threshold, how it was chosen and what it gave in cross-validation."""
        val = self.validation
        return (
            f"{self.positive_class} when the probability is ≥ {self.threshold:.{PROBABILITY_DIGITS}f} "
            f"({OPERATING_RULE}); "
            f"in cross-validation: sensitivity {val.sensitivity.text()}, specificity {val.specificity.text()}"
        )

    def markdown(self) -> str:
        """The card as Markdown: model, training data, operating point, per-cohort metrics, versions."""
        size = f", {self.img_size}-pixel inputs" if self.img_size else ""
        epochs = f", {self.epochs} epoch{'s' if self.epochs != 1 else ''} per fold" if self.epochs else ""
        val = self.validation
        lines = [
            f"**Model**: `{self.model}`, the ensemble (mean probability) of the {self.n_folds} fold models "
            f"of run `{self.run_name}`{size}.",
            "",
            f"**Training data**: `{self.training_data}`: {val.n_images} images "
            f"({val.n_positive} {self.positive_class}) "
            f"of {val.n_patients} patients (an image without a patient id counts as one patient), "
            f"{self.n_folds}-fold patient-level cross-validation{epochs}; run started {self.started}.",
            "",
            f"**Operating point**: {self.operating_point_text()}.",
            "",
            "| cohort | scored by | images (positive) | patients | AUC [95 % CI] "
            "| sensitivity [95 % CI] | specificity [95 % CI] |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in self.cohorts:
            lines.append(
                f"| {c.name} | {c.scored_by} | {c.n_images} ({c.n_positive}) | {c.n_patients} | "
                f"{st.format_ci(c.auc, c.auc_ci, scale=1.0, digits=3)} | "
                f"{c.sensitivity.text()} | {c.specificity.text()} |"
            )
        lines += [
            "",
            "AUC: DeLong's interval; sensitivity and specificity: Wilson's score intervals (images, not patients).",
            "",
            f"**Version**: hsqformer {self.version} (the run was trained with {self.trained_with}). "
            "A research model: its output is not a diagnosis.",
        ]
        return "\n".join(lines)


def model_card(run: str | Path) -> ModelCard:
    """Compute the card of the finished cv run in ``run``; one-line errors for a folder that is not one."""
    run = Path(run)
    scores = load_run(run)
    record = read_run(run)
    config = _read_yaml(run / CONFIG_FILE)
    versions = _read_json(run / VERSIONS_FILE) if (run / VERSIONS_FILE).is_file() else {}
    validation = scores.cohorts[VALIDATION]
    truth = _truth(validation, scores.positive_class)
    if truth.all() or not truth.any():
        raise HSQformerError(f"run {run}: the validation predictions hold one class only; no operating point")
    threshold = operating_threshold(truth, validation.scores, None)
    cohorts = [_cohort_card(VALIDATION, "out-of-fold", validation, scores.positive_class, threshold)]
    cohorts += [
        _cohort_card(name, "fold ensemble", cohort, scores.positive_class, threshold)
        for name, cohort in scores.cohorts.items()
        if name != VALIDATION
    ]
    return ModelCard(
        run_name=run.resolve().name,
        model=scores.model,
        classes=scores.classes,
        positive_class=scores.positive_class,
        threshold=threshold,
        training_data=_data_name(str(record.get("data", "?"))),
        n_folds=len(scores.fold_aucs),
        img_size=_int_or_none(config.get("augment", {}).get("img_size")),
        epochs=_int_or_none(config.get("trainer", {}).get("epochs")),
        cohorts=cohorts,
        trained_with=str(versions.get("packages", {}).get("hsqformer", "an unknown version")),
        version=_installed_version(),
        started=str(record.get("started", "?")),
    )


def _cohort_card(name: str, scored_by: str, cohort: CohortScores, positive: str, threshold: float) -> CohortCard:
    truth = _truth(cohort, positive)
    predicted = cohort.scores >= threshold
    tp, fp, tn, fn = (int(v) for v in st.confusion_counts(truth, predicted).sum(axis=0))
    if truth.all() or not truth.any():
        auc, auc_ci = math.nan, (math.nan, math.nan)
    else:
        dl = st.delong(truth, cohort.scores)
        auc, auc_ci = float(dl.aucs[0]), dl.ci(0)
    return CohortCard(
        name=name,
        scored_by=scored_by,
        n_images=len(truth),
        n_positive=int(truth.sum()),
        n_patients=int(st.patient_groups(cohort.patients).max(initial=-1)) + 1,
        auc=auc,
        auc_ci=auc_ci,
        sensitivity=Proportion(tp, tp + fn, *st.wilson(tp, tp + fn)),
        specificity=Proportion(tn, tn + fp, *st.wilson(tn, tn + fp)),
    )


def _truth(cohort: CohortScores, positive: str) -> np.ndarray:
    return np.array([label == positive for label in cohort.labels], dtype=bool)


def _data_name(source: str) -> str:
    """The training data's folder name (a manifest file: its folder and name), not its full local path."""
    path = Path(source)
    return f"{path.parent.name}/{path.name}" if path.suffix else path.name


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _installed_version() -> str:
    try:
        return version("hsqformer")
    except PackageNotFoundError:
        return "(not installed)"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise HSQformerError(f"cannot read {path} ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise HSQformerError(f"{path}: not a JSON object")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise HSQformerError(f"cannot read {path} ({type(err).__name__})") from None
    return data if isinstance(data, dict) else {}
