"""Dataset audit: what a model's score must be read against.

For one or more datasets the audit reports image counts per class and center,
exact duplicate images (by a hash of the decoded pixels) within and across the
sets, patient ids that occur in more than one set, and a *shortcut floor*: the
cross-validated AUC of a random forest that sees only image width, height and a
16-bin grey-level histogram. Where that floor is high (about 0.80 on
liver-sysu, whose classes differ in image size) a model's AUC means little
unless it clearly beats it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from hsqformer.data.images import load_image
from hsqformer.data.manifest import MANIFEST_NAME, check_label_spelling, class_names, load_dataset, row_origins
from hsqformer.data.splits import patient_folds
from hsqformer.errors import HSQformerError

HISTOGRAM_BINS = 16
FEATURE_SETS = {
    "width, height, grey histogram": slice(0, 2 + HISTOGRAM_BINS),
    "width, height": slice(0, 2),
    "grey histogram": slice(2, 2 + HISTOGRAM_BINS),
}
SHORTCUT_FEATURES = "width, height, grey histogram"
N_TREES = 200


@dataclass
class ShortcutResult:
    """Cross-validated AUC of a random forest on a few image statistics.

    ``std`` is the sample standard deviation over folds (n - 1), as in the models' fold summaries.
    """

    features: str
    mean: float
    std: float
    fold_aucs: list[float]
    n_folds: int
    patient_grouped: bool
    metric: str

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}"


@dataclass
class SetAudit:
    """Counts and shortcut floor of one dataset."""

    name: str
    source: str
    classes: list[str]
    n_images: int
    n_patients: int
    missing_patient_ids: int
    counts: dict[str, dict[str, int]]
    shortcut: list[ShortcutResult] = field(default_factory=list)
    shortcut_note: str = ""

    @property
    def floor(self) -> ShortcutResult | None:
        """The shortcut floor on all the image statistics (``None`` when it could not be computed)."""
        return next((r for r in self.shortcut if r.features == SHORTCUT_FEATURES), None)


@dataclass
class DuplicateGroup:
    """Images with identical decoded pixels."""

    sha256: str
    members: list[dict[str, str]]
    across_sets: bool
    conflicting_labels: bool


@dataclass
class SharedPatients:
    """Patient ids found in two sets (a patient in a training and a test set leaks)."""

    set_a: str
    set_b: str
    patient_ids: list[str]


@dataclass
class AuditReport:
    """Everything ``run_audit`` found; ``to_markdown`` renders it for people, ``to_dict`` for JSON."""

    sets: list[SetAudit]
    duplicates: list[DuplicateGroup]
    shared_patients: list[SharedPatients]
    positive_class: str | None
    warnings: list[str] = field(default_factory=list)

    @property
    def shortcut_auc(self) -> ShortcutResult | None:
        """The shortcut floor of the first (primary) set."""
        return self.sets[0].floor if self.sets else None

    def to_dict(self) -> dict:
        """A JSON-ready dictionary of the whole report."""
        data = asdict(self)
        for entry, audit in zip(data["sets"], self.sets):
            entry["floor"] = asdict(audit.floor) if audit.floor else None
        return data

    def to_markdown(self) -> str:
        """The report as plain Markdown."""
        lines = ["# Data audit", "", "| set | images | patients | classes | source |", "|---|---|---|---|---|"]
        for s in self.sets:
            patients = str(s.n_patients)
            if s.missing_patient_ids:
                patients += f" ({s.missing_patient_ids} images without id)"
            lines.append(_row([s.name, s.n_images, patients, ", ".join(s.classes), s.source]))
        for s in self.sets:
            lines += ["", f"## {_cell(s.name)}: images per class and center", ""]
            lines += _counts_table(s.counts)
        lines += ["", "## Shortcut floor", "",
                  f"Cross-validated AUC of a random forest ({N_TREES} trees) on image statistics alone. "
                  "A model has to beat the first row of its set, not 0.5.", "",
                  "| set | features | AUC (mean ± std) | metric | folds |", "|---|---|---|---|---|"]
        for s in self.sets:
            if not s.shortcut:
                lines.append(_row([s.name, "-", f"not computed: {s.shortcut_note}", "-", "-"]))
            for r in s.shortcut:
                folds = f"{r.n_folds}, {'patient-level' if r.patient_grouped else 'image-level'}"
                lines.append(_row([s.name, r.features, r, r.metric, folds]))
        lines += ["", "## Exact duplicate images", ""]
        if not self.duplicates:
            lines.append("None (no two images have identical decoded pixels).")
        for g in self.duplicates:
            scope = "across sets" if g.across_sets else "within a set"
            conflict = ", **conflicting labels**" if g.conflicting_labels else ""
            lines.append(f"- {scope}{conflict} (sha256 {g.sha256[:12]}):")
            lines += [f"  - {_cell(m['set'])}: {_cell(m['path'])} ({_cell(m['label'])})" for m in g.members]
        if len(self.sets) > 1:
            lines += ["", "## Patient ids shared across sets", ""]
            if not self.shared_patients:
                lines.append("None.")
            for sp in self.shared_patients:
                shown = ", ".join(sp.patient_ids[:20]) + (" ..." if len(sp.patient_ids) > 20 else "")
                lines.append(f"- {_cell(sp.set_a)} & {_cell(sp.set_b)}: {len(sp.patient_ids)} ids: {_cell(shown)}")
        if self.warnings:
            lines += ["", "## Warnings", ""] + [f"- {_cell(w)}" for w in self.warnings]
        return "\n".join(lines) + "\n"


def run_audit(
    sources: Sequence[str | Path | pd.DataFrame],
    classes: Sequence[str] | None = None,
    n_folds: int = 5,
    seed: int = 0,
    *,
    positive_class: str | None = None,
    progress: bool = True,
) -> AuditReport:
    """Audit datasets (paths as for ``load_dataset``, or tables it returned).

    One pass over every image computes its pixel hash, size and grey histogram.
    The shortcut folds are those of ``patient_folds`` with the same ``n_folds``
    and ``seed`` as training, so the floor is measured on the very same splits.
    Warnings (e.g. missing patient ids) are collected into the report and re-issued.
    """
    if not sources:
        raise HSQformerError("audit needs at least one dataset")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Images are decoded once, for the statistics (a bad one is reported with its row there).
        frames = [s if isinstance(s, pd.DataFrame) else load_dataset(s, classes, verify_images=False) for s in sources]
        names = _set_names(sources, frames)
        _check_label_spelling_across(names, frames)
        for name, frame in zip(names, frames):
            labels = class_names(frame, classes)
            if positive_class is not None and positive_class not in labels:
                raise HSQformerError(
                    f"positive class '{positive_class}' is not a class of {name} ({', '.join(labels)})"
                )
        stats = [_image_stats(frame, name, progress) for frame, name in zip(frames, names)]
        sets = [
            _audit_set(name, frame, feats, classes, n_folds, seed, positive_class)
            for name, frame, (feats, _) in zip(names, frames, stats)
        ]
    messages = list(dict.fromkeys(str(w.message) for w in caught))
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=2)
    hashes = [h for _, h in stats]
    return AuditReport(
        sets=sets,
        duplicates=_duplicates(names, frames, hashes),
        shared_patients=_shared_patients(names, frames),
        positive_class=positive_class,
        warnings=messages,
    )


def _check_label_spelling_across(names: list[str], frames: list[pd.DataFrame]) -> None:
    """Labels of the sets that differ only by case or spaces ('malignant' / 'Malignant') would be two
    classes and could change which class is positive; refused, as ``cv`` refuses them in a test cohort."""
    labels, origins = [], []
    for name, frame in zip(names, frames):
        for label in dict.fromkeys(frame["label"]):
            labels.append(label)
            origins.append(f"set {name}")
    check_label_spelling(labels, origins)


def _set_names(sources: Sequence[str | Path | pd.DataFrame], frames: list[pd.DataFrame]) -> list[str]:
    """Short, distinct names: the folder (or CSV) name, numbered where two clash."""
    names = []
    for i, (source, frame) in enumerate(zip(sources, frames)):
        path = Path(frame.attrs.get("source", "")) if isinstance(source, pd.DataFrame) else Path(source)
        if path.suffix.lower() == ".csv":
            path = path.absolute().parent if path.name == MANIFEST_NAME else path.with_suffix("")
        name = path.name or f"set{i + 1}"
        names.append(name if name not in names else f"{name}#{i + 1}")
    return names


def _image_stats(frame: pd.DataFrame, name: str, progress: bool) -> tuple[np.ndarray, list[str]]:
    """Per image: [width, height, normalised 16-bin grey histogram] and a SHA-256 of its RGB pixels.

    Images are decoded in parallel threads (Pillow decodes without the GIL); the first image
    that cannot be read (in row order) stops the audit with its row, before anything is printed.
    """
    paths = frame["path"].tolist()
    where = row_origins(frame)

    def stats(i: int) -> tuple[str, list[float]]:
        image = load_image(paths[i], where[i])
        width, height = image.size
        digest = hashlib.sha256(f"{width}x{height}".encode())
        digest.update(image.tobytes())
        grey = np.asarray(image.convert("L").histogram(), dtype=np.float64)
        histogram = grey.reshape(HISTOGRAM_BINS, -1).sum(axis=1)
        return digest.hexdigest(), [width, height, *(histogram / histogram.sum())]

    features = np.zeros((len(frame), 2 + HISTOGRAM_BINS))
    hashes = []
    workers = min(8, max(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(paths), desc=f"audit {name}", unit="img", disable=None if progress else True, leave=False
    ) as bar:
        try:
            for i, (digest, row) in enumerate(pool.map(stats, range(len(paths)))):
                hashes.append(digest)
                features[i] = row
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # do not decode the rest of the set
            raise
    return features, hashes


def _audit_set(
    name: str,
    frame: pd.DataFrame,
    features: np.ndarray,
    classes: Sequence[str] | None,
    n_folds: int,
    seed: int,
    positive_class: str | None,
) -> SetAudit:
    labels = class_names(frame, classes)
    centers = frame["center"].replace("", "(none)")
    counts = pd.crosstab(frame["label"], centers).reindex(labels, fill_value=0)
    has_id = frame["patient_id"] != ""
    audit = SetAudit(
        name=name,
        source=str(frame.attrs.get("source", "")),
        classes=labels,
        n_images=len(frame),
        n_patients=int(frame.loc[has_id, "patient_id"].nunique()),
        missing_patient_ids=int((~has_id).sum()),
        counts={label: {str(c): int(n) for c, n in row.items()} for label, row in counts.iterrows()},
    )
    try:
        with warnings.catch_warnings():
            # Missing ids are already reported by load_dataset and shown as "image-level" folds.
            warnings.simplefilter("ignore", UserWarning)
            folds = patient_folds(frame, n_folds, seed)
    except HSQformerError as err:
        audit.shortcut_note = str(err)
        return audit
    y = np.array([labels.index(label) for label in frame["label"]])
    positive = labels.index(positive_class) if positive_class else len(labels) - 1
    audit.shortcut = [
        _shortcut_auc(features[:, columns], y, folds, seed, positive, labels, described, has_id.all())
        for described, columns in FEATURE_SETS.items()
    ]
    return audit


def _shortcut_auc(
    x: np.ndarray,
    y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    seed: int,
    positive: int,
    labels: list[str],
    described: str,
    grouped: bool,
) -> ShortcutResult:
    """AUC per fold of a random forest: binary for two classes, one-vs-rest macro otherwise."""
    aucs = []
    for train, val in folds:
        proba = forest_probabilities(x[train], y[train], [x[val]], seed, len(labels))[0]
        if len(labels) == 2:
            aucs.append(roc_auc_score(y[val] == positive, proba[:, positive]))
        else:
            aucs.append(roc_auc_score(y[val], proba, multi_class="ovr", average="macro", labels=range(len(labels))))
    metric = f"AUC ({labels[positive]} vs rest)" if len(labels) == 2 else "one-vs-rest macro AUC"
    return ShortcutResult(
        features=described,
        mean=float(np.mean(aucs)),
        std=float(np.std(aucs, ddof=1)) if len(aucs) > 1 else float("nan"),
        fold_aucs=[float(a) for a in aucs],
        n_folds=len(folds),
        patient_grouped=bool(grouped),
        metric=metric,
    )


def forest_probabilities(
    x_train: np.ndarray, y_train: np.ndarray, x_eval: Sequence[np.ndarray], seed: int, n_classes: int
) -> list[np.ndarray]:
    """Class probabilities (n, n_classes) of the shortcut forest, fitted once, for each array of ``x_eval``."""
    forest = RandomForestClassifier(n_estimators=N_TREES, random_state=seed, n_jobs=1)
    forest.fit(x_train, y_train)
    outputs = []
    for x in x_eval:
        proba = np.zeros((len(x), n_classes))
        if len(x):
            proba[:, forest.classes_] = forest.predict_proba(x)
        outputs.append(proba)
    return outputs


def image_features(paths: Sequence[str], desc: str = "shortcut floor", progress: bool = True) -> np.ndarray:
    """The shortcut features of each image: width, height and a normalised 16-bin grey histogram."""
    frame = pd.DataFrame({"path": list(paths)})
    return _image_stats(frame, desc, progress)[0]


def _duplicates(names: list[str], frames: list[pd.DataFrame], hashes: list[list[str]]) -> list[DuplicateGroup]:
    members: dict[str, list[dict[str, str]]] = {}
    for name, frame, set_hashes in zip(names, frames, hashes):
        for digest, path, label in zip(set_hashes, frame["path"], frame["label"]):
            members.setdefault(digest, []).append({"set": name, "path": path, "label": label})
    return [
        DuplicateGroup(
            sha256=digest,
            members=group,
            across_sets=len({m["set"] for m in group}) > 1,
            conflicting_labels=len({m["label"] for m in group}) > 1,
        )
        for digest, group in members.items()
        if len(group) > 1
    ]


def _shared_patients(names: list[str], frames: list[pd.DataFrame]) -> list[SharedPatients]:
    ids = [set(frame["patient_id"]) - {""} for frame in frames]
    shared = []
    for (a, ids_a), (b, ids_b) in itertools.combinations(zip(names, ids), 2):
        common = sorted(ids_a & ids_b)
        if common:
            shared.append(SharedPatients(set_a=a, set_b=b, patient_ids=common))
    return shared


def _counts_table(counts: dict[str, dict[str, int]]) -> list[str]:
    centers = sorted({c for row in counts.values() for c in row})
    lines = [_row(["class", *centers, "total"]), "|---" * (len(centers) + 2) + "|"]
    for label, row in counts.items():
        lines.append(_row([label, *(row.get(c, 0) for c in centers), sum(row.values())]))
    totals = [sum(row.get(c, 0) for row in counts.values()) for c in centers]
    grand = sum(sum(row.values()) for row in counts.values())
    lines.append(_row(["total", *totals, grand]))
    return lines


def _cell(value: object) -> str:
    """Text that cannot break a Markdown table or list: '|' escaped, line breaks shown as '\\n'."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n")


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"
