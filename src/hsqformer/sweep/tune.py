"""``hsqformer tune``: hyper-parameter search with Optuna over patient-level cross-validation on the training data.

SPACE.yaml::

    params:
      optimizer.lr: {low: 2.0e-4, high: 3.0e-3, log: true}      # a float range (log-uniform)
      trainer.epochs: {low: 4, high: 12, step: 4}               # whole numbers: an int range
      model.kwargs.drop_path_rate: {low: 0.0, high: 0.3, optional: true}  # skipped for a model without it
      model.kwargs.moe_mode: {choices: [sparse, dense]}         # values to choose from
      mixup:                                                    # named settings to choose from
        choices:
          "off": {augment.mixup: 0.0, augment.cutmix: 0.0}
          "on": {augment.mixup: 0.8, augment.cutmix: 1.0}
    startup_trials: 4      # optional: random trials before TPE models the results (and before pruning)
    pruning: true          # optional: median pruning on per-epoch validation AUC

Each trial is a ``cv`` run of the base config with the trial's settings, on the data's folds (the
base config's ``cv`` section), in ``OUT/trials/trial_NNNN/``. No test cohort is ever read.

Objective: the mean over folds of each fold's validation AUC (its best-AUC epoch, the model that
``cv`` keeps). Chosen over the pooled out-of-fold AUC because it is what the pruner can see as
a trial goes (fold by fold, each fold against the same fold of earlier trials) and because each
fold model is judged on the images it did not train on, as the paper reports folds; the pooled
AUC, which also mixes the fold models' score scales, is recorded per trial beside it.

Pruning: after each epoch, the best validation AUC of the fold so far is reported at step
``fold x epochs + epoch``; Optuna's median pruner stops a trial that is below the median of earlier
trials at that step (not before ``startup_trials`` trials finished, nor in the first half of
fold 0). A pruned trial's folder is deleted; it counts towards the budget.

Starting from the recipe: with ``--start-from-base`` trial 0 is the base config's own values of the
space's parameters (each must lie in its range or be one of its choices), and it counts among the
startup trials. A few random trials can miss a good recipe that is already known: on liver-sysu
all four of HSQformer-S's draws had mixup on, which its hand recipe switches off, and its tuned best
fell below that recipe. Starting from the base, a search's best is the recipe or better (on the folds
that judge it).

Resuming: the study lives in ``OUT/study.db`` (SQLite). Run the same command again: finished
trials are kept, and a trial that was interrupted is run again with the same settings, its cv
run resumed where it stopped (done folds skipped). ``--trials`` is the total budget (complete +
pruned trials), so a larger number extends a finished search. The sampler is seeded with
``--seed``, the worker and the number of trials so far, mixed by NumPy's ``SeedSequence``: an
interrupted search does not redraw the same settings (seeding with ``--seed`` plus the count did:
NumPy's legacy generator draws nearly the same first numbers from seeds 0 and 3). With
``--jobs N`` (and ``--devices``), N worker processes share the study, each running its share of
the remaining trials; the TPE sampler's constant liar keeps them apart.

Outputs: ``best.yaml`` (the base config with the best trial's settings: a complete config for
the final ``hsqformer cv``), ``trials.csv``, ``report.md`` with ``history.png``.
"""

from __future__ import annotations

import fcntl
import math
import shlex
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, Trial, TrialState

from hsqformer.errors import HSQformerError
from hsqformer.sweep.processes import Job, log_tail, run_jobs
from hsqformer.sweep.settings import (
    Settings,
    apply_settings,
    check_key,
    check_models,
    drop_weights,
    read_yaml_file,
    set_arguments,
    value_label,
    yaml_text,
)
from hsqformer.training.config import Config, config_to_dict, first_difference, load_config
from hsqformer.files import read_format_json, write_csv, write_json, write_text

TUNE_FORMAT = "hsqformer-tune/1"
TUNE_FILE = "tune.json"
STUDY_FILE = "study.db"
STUDY_NAME = "hsqformer-tune"
TRIALS_DIR = "trials"
LOGS_DIR = "logs"
LOCK_FILE = "tune.lock"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_SPACE_KEYS = ("params", "startup_trials", "pruning")
_RANGE_FIELDS = ("low", "high", "log", "step", "optional")


@dataclass(frozen=True)
class Param:
    """One searched setting: a float or int range of a config key, or choices (values of a key, or named settings)."""

    name: str
    kind: str  # "float", "int" or "choice"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: dict[str, Settings] = field(default_factory=dict)

    def suggest(self, trial: Trial) -> Settings:
        """The settings this parameter takes in ``trial``."""
        if self.kind == "choice":
            return dict(self.choices[trial.suggest_categorical(self.name, list(self.choices))])
        if self.kind == "int":
            value = trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
            return {self.name: value}
        return {self.name: trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)}

    def base_value(self, base_raw: dict[str, Any], where: str) -> Any:
        """This parameter's value (as Optuna records it) in the base config, which the space must be able to draw."""
        if self.kind == "choice":
            for label, settings in self.choices.items():
                if all(_config_value(base_raw, key, where) == value for key, value in settings.items()):
                    return label
            keys = sorted({key for settings in self.choices.values() for key in settings})
            held = ", ".join(f"{key} = {value_label(_config_value(base_raw, key, where))}" for key in keys)
            raise HSQformerError(f"{where}: the base config's {held} is none of the choices ({', '.join(self.choices)})")
        value = _config_value(base_raw, self.name, where)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HSQformerError(f"{where}: the base config's value {value!r} is not a number")
        if not self.low <= value <= self.high:
            raise HSQformerError(f"{where}: the base config's value {value_label(value)} is outside the range "
                                 f"[{value_label(self.low)}, {value_label(self.high)}]")
        if self.step is not None and not math.isclose(
                (value - self.low) / self.step, round((value - self.low) / self.step), abs_tol=1e-9):
            raise HSQformerError(f"{where}: the base config's value {value_label(value)} is not on the range's steps "
                                 f"of {value_label(self.step)} from {value_label(self.low)}")
        return int(value) if self.kind == "int" else float(value)

    def bounds(self) -> list[tuple[str, Settings]]:
        """(label, settings) at the ends of the range or for each choice: what the checks build."""
        if self.kind == "choice":
            return list(self.choices.items())
        cast = int if self.kind == "int" else float
        return [(value_label(cast(v)), {self.name: cast(v)}) for v in (self.low, self.high)]


@dataclass
class Space:
    """A checked search space."""

    path: Path
    params: list[Param]
    startup_trials: int | None
    pruning: bool
    raw: dict[str, Any]
    skipped: list[str]  # optional parameters the base config's model does not take


@dataclass
class Search:
    """A checked search: base config, space, data and the search folder."""

    config: Path
    overrides: list[str]
    base: Config
    space: Space
    data: str
    out: Path
    trials: int
    seed: int
    keep_weights: bool
    start_from_base: bool = False

    @property
    def storage(self) -> str:
        return f"sqlite:///{(self.out / STUDY_FILE).resolve()}"

    def startup_trials(self) -> int:
        """Random trials before TPE (and before the pruner judges): the space's, or a third of the budget (2 to 10)."""
        return self.space.startup_trials or max(2, min(10, self.trials // 3))


def say(message: str) -> None:
    """A progress line on stderr."""
    print(f"[hsqformer tune] {message}", file=sys.stderr, flush=True)


def read_space(path: str | Path, base: Config) -> Space:
    """Read and check SPACE.yaml against the base config: every range end and choice builds a valid config and model."""
    path = Path(path)
    where = f"space {path}"
    raw = read_yaml_file(path, "space")
    if not isinstance(raw, dict):
        raise HSQformerError(f"{where}: expected a mapping with 'params', got {type(raw).__name__}")
    unknown = [key for key in raw if key not in _SPACE_KEYS]
    if unknown:
        raise HSQformerError(f"{where}: unknown key '{unknown[0]}' (a space has: {', '.join(_SPACE_KEYS)})")
    specs = raw.get("params")
    if not isinstance(specs, dict) or not specs:
        raise HSQformerError(f"{where}: no parameters to search; give 'params' with at least one range or choice")
    startup = raw.get("startup_trials")
    if startup is not None and (not isinstance(startup, int) or isinstance(startup, bool) or startup < 1):
        raise HSQformerError(f"{where}: 'startup_trials' must be a whole number of at least 1, got {startup!r}")
    pruning = raw.get("pruning", True)
    if not isinstance(pruning, bool):
        raise HSQformerError(f"{where}: 'pruning' must be true or false, got {pruning!r}")
    base_raw = config_to_dict(base)
    params, skipped = [], []
    for name, spec in specs.items():
        param, optional = _read_param(name, spec, f"{where}, '{name}'")
        if optional and not _model_takes(base_raw, param, f"{where}, '{name}'"):
            skipped.append(name)
            continue
        params.append(param)
    if not params:
        raise HSQformerError(f"{where}: every parameter is optional and not taken by model '{base.model.name}'")
    checked = [
        (f"{where}, '{p.name}' = {label}", apply_settings(base_raw, settings, f"{where}, '{p.name}' = {label}"))
        for p in params
        for label, settings in p.bounds()
    ]
    check_models(checked)
    return Space(path, params, startup, pruning, raw, skipped)


def _model_takes(base_raw: dict[str, Any], param: Param, where: str) -> bool:
    """Whether the base config's model accepts ``param`` (an optional model argument) at all."""
    label, settings = param.bounds()[0]
    try:
        check_models([(where, apply_settings(base_raw, settings, f"{where} = {label}"))])
    except HSQformerError as err:
        if "unexpected keyword argument" in str(err):
            return False
        raise
    return True


def _read_param(name: Any, spec: Any, where: str) -> tuple[Param, bool]:
    """One parameter and whether it is optional."""
    if not isinstance(spec, dict):
        raise HSQformerError(f"{where}: expected {{low: ..., high: ...}} or {{choices: ...}}, got {spec!r}")
    if isinstance(name, str) and "." not in name:  # named settings to choose from
        if set(spec) != {"choices"} or not isinstance(spec["choices"], dict):
            raise HSQformerError(f"{where}: a name without dots takes 'choices' mapping labels to settings")
        choices = {}
        for label, settings in spec["choices"].items():
            if not isinstance(label, str):
                raise HSQformerError(f"{where}: choice label {label!r} must be a string (quote on/off/yes/no)")
            if not isinstance(settings, dict) or not settings:
                raise HSQformerError(f"{where}, '{label}': expected settings such as {{augment.mixup: 0.8}}")
            choices[label] = {check_key(key, f"{where}, '{label}'"): value for key, value in settings.items()}
        return _choice(name, choices, where), False
    key = check_key(name, where)
    if "choices" in spec:
        if set(spec) - {"choices", "optional"}:
            raise HSQformerError(f"{where}: 'choices' goes without low/high/log/step")
        values = spec["choices"]
        if isinstance(values, list):
            choices = {value_label(v): {key: v} for v in values}
        elif isinstance(values, dict):
            choices = {str(label): {key: v} for label, v in values.items()}
        else:
            raise HSQformerError(f"{where}: 'choices' must be a list of values, got {values!r}")
        return _choice(key, choices, where), _optional(spec, key, where)
    extra = set(spec) - set(_RANGE_FIELDS)
    if extra:
        raise HSQformerError(f"{where}: unknown field '{min(extra)}' (a range has: {', '.join(_RANGE_FIELDS)})")
    if "low" not in spec or "high" not in spec:
        raise HSQformerError(f"{where}: has no range; give low and high, or choices")
    low, high = (_number(spec[end], f"{where}: {end}") for end in ("low", "high"))
    log = spec.get("log", False)
    step = spec.get("step")
    if not isinstance(log, bool):
        raise HSQformerError(f"{where}: 'log' must be true or false, got {log!r}")
    if not low < high:
        raise HSQformerError(f"{where}: has no range: low {low} is not below high {high}")
    if log and low <= 0:
        raise HSQformerError(f"{where}: a log range needs low > 0, got {low}")
    if step is not None:
        step = _number(step, f"{where}: step")
        if step <= 0 or log:
            raise HSQformerError(f"{where}: step must be positive and goes without log")
    whole = all(isinstance(v, int) for v in (low, high, step if step is not None else 1))
    param = Param(key, "int" if whole else "float", low, high, log, step)
    return param, _optional(spec, key, where)


def _config_value(raw: dict[str, Any], key: str, where: str) -> Any:
    """The value of a dotted config key in a plain config; a key the config does not set is an error."""
    value: Any = raw
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise HSQformerError(f"{where}: the base config does not set '{key}'; set it (in the config or with --set)")
        value = value[part]
    return value


def base_params(search: Search) -> dict[str, Any]:
    """The base config's own settings of the space's parameters: the trial that ``--start-from-base`` runs first."""
    base_raw = config_to_dict(search.base)
    where = f"--start-from-base, space {search.space.path}"
    return {p.name: p.base_value(base_raw, f"{where}, '{p.name}'") for p in search.space.params}


def _choice(name: str, choices: dict[str, Settings], where: str) -> Param:
    if len(choices) < 2:
        raise HSQformerError(f"{where}: has no range: give at least two choices")
    return Param(name, "choice", choices=choices)


def _optional(spec: dict[str, Any], key: str, where: str) -> bool:
    optional = spec.get("optional", False)
    if not isinstance(optional, bool):
        raise HSQformerError(f"{where}: 'optional' must be true or false, got {optional!r}")
    if optional and not key.startswith("model.kwargs."):
        raise HSQformerError(f"{where}: only model.kwargs.* parameters can be optional")
    return optional


def _number(value: Any, where: str) -> int | float:
    if isinstance(value, bool):
        raise HSQformerError(f"{where} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    except (TypeError, ValueError):
        raise HSQformerError(f"{where} must be a number, got {value!r}") from None


def open_search(
    config: Path, overrides: Sequence[str], space_path: Path, data: str, out: Path, *, trials: int, seed: int,
    keep_weights: bool, start_from_base: bool = False,
) -> Search:
    """Read the base config and the space; refuse a search folder that holds another search."""
    base = load_config(config, overrides)
    space = read_space(space_path, base)
    for name in space.skipped:
        say(f"'{name}' skipped: model '{base.model.name}' does not take that argument (optional in {space_path})")
    if out.exists() and not out.is_dir():
        raise HSQformerError(f"--out {out} exists and is not a folder")
    search = Search(config, list(overrides), base, space, data, out, trials, seed, keep_weights, start_from_base)
    if start_from_base:
        base_params(search)
    if (out / TUNE_FILE).is_file():
        saved = read_format_json(out / TUNE_FILE, TUNE_FORMAT, f"no {TUNE_FILE} in {out}")
        now = _record(search)
        differs = first_difference(saved.get("config", {}), now["config"])
        for what, same in (
            (f"config (key '{differs}' differs)", differs is None),
            ("space", saved.get("space") == now["space"]),
            ("data", saved.get("data") == now["data"]),
            ("--seed", saved.get("seed") == now["seed"]),
            ("--start-from-base", saved.get("start_from_base", False) == now["start_from_base"]),
        ):
            if not same:
                raise HSQformerError(f"{out} holds a search with another {what}; use another --out")
    elif out.is_dir() and any(out.iterdir()):
        raise HSQformerError(f"--out {out} is not empty and holds no {TUNE_FILE}: not a search folder; choose another")
    return search


def _record(search: Search) -> dict[str, Any]:
    return {
        "format": TUNE_FORMAT,
        "config": config_to_dict(search.base),
        "config_file": str(search.config),
        "overrides": search.overrides,
        "space": search.space.raw,
        "data": str(Path(search.data).resolve()),
        "seed": search.seed,
        "start_from_base": search.start_from_base,
    }


@contextmanager
def search_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/tune.lock``: one coordinating ``hsqformer tune`` per search folder."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / LOCK_FILE).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HSQformerError(f"another hsqformer tune is running in {out}; wait for it or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_study(search: Search, worker: int = 0) -> optuna.Study:
    """The search's study (created on first use), with a TPE sampler seeded for this point of the search."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(search.storage)
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize", load_if_exists=True)
    startup = search.startup_trials()
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed(search.seed, worker, len(study.trials)),
                                               n_startup_trials=startup)
    study.pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=search.base.trainer.epochs // 2)
        if search.space.pruning else optuna.pruners.NopPruner()
    )
    return study


def sampler_seed(seed: int, worker: int, trials_so_far: int) -> int:
    """The sampler's seed for a worker that starts after ``trials_so_far`` trials: unrelated streams for nearby inputs."""
    return int(np.random.SeedSequence([seed, worker, trials_so_far]).generate_state(1)[0])


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Trials left running by an interrupted search: marked failed and queued again with the same settings.

    The retry takes over the interrupted trial's run folder and resumes it. Only the process that
    holds the search's lock calls this, so no trial of a live process is touched.
    """
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
        base = {"base": True} if trial.user_attrs.get("base") else {}
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, **base})
    return [trial.number for trial in stale]


def finished_trials(study: optuna.Study) -> int:
    """Trials that count towards the budget: complete and pruned."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class ReportAUC(L.Callback):
    """Reports each epoch's best-so-far validation AUC of fold ``fold`` to ``trial``; stops the trial when pruned."""

    def __init__(self, trial: Trial, fold: int, epochs: int) -> None:
        self.trial = trial
        self.fold = fold
        self.epochs = epochs
        self.best = -math.inf

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val_auc")
        if value is None or math.isnan(float(value)):
            return
        self.best = max(self.best, float(value))
        step = self.fold * self.epochs + trainer.current_epoch
        self.trial.report(self.best, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"fold {self.fold}, epoch {trainer.current_epoch}: best validation AUC {self.best:.3f} "
                "is below the median of earlier trials"
            )


def run_trials(search: Search, n_trials: int, worker: int = 0) -> None:
    """Run ``n_trials`` trials of the search in this process."""
    from hsqformer.training.engine import VALIDATION, run_cv
    from hsqformer.training.run_folder import RUN_FILE

    study = load_study(search, worker)
    base_raw = config_to_dict(search.base)
    trials_dir = search.out / TRIALS_DIR

    def objective(trial: Trial) -> float:
        settings: Settings = {}
        for param in search.space.params:
            settings.update(param.suggest(trial))
        trial.set_user_attr("settings", settings)
        cfg = apply_settings(base_raw, settings, f"trial {trial.number}")
        folder = trials_dir / f"trial_{trial.number:04d}"
        earlier = trial.user_attrs.get("retry_of")
        if earlier is not None and (trials_dir / f"trial_{earlier:04d}" / RUN_FILE).is_file() and not folder.exists():
            (trials_dir / f"trial_{earlier:04d}").rename(folder)
        resume = (folder / RUN_FILE).is_file()
        if folder.exists() and not resume:  # stopped before its run folder was complete: start it again
            shutil.rmtree(folder)
        done = finished_trials(study)
        say(f"trial {trial.number} ({done} of {search.trials} finished so far): {' '.join(set_arguments(settings)[1::2])}"
            f" -- {'resuming' if resume else 'training'} in {folder}")
        command = shlex.join(["hsqformer", "cv", "--config", str(search.config),
                              *[i for o in search.overrides for i in ("--set", o)], *set_arguments(settings),
                              "--data", search.data, "--out", str(folder)])
        callbacks = (lambda k: [ReportAUC(trial, k, cfg.trainer.epochs)]) if search.space.pruning else None
        try:
            metrics = run_cv(cfg, search.data, {}, folder, resume=resume, command=command, fold_callbacks=callbacks)
        except optuna.TrialPruned as pruned:
            shutil.rmtree(folder, ignore_errors=True)
            say(f"trial {trial.number} pruned: {pruned}")
            raise
        value = float(metrics["summary"][VALIDATION]["auc"]["mean"])
        trial.set_user_attr("fold_aucs", [f["cohorts"][VALIDATION]["auc"] for f in metrics["folds"]])
        trial.set_user_attr("pooled_auc", metrics["pooled_validation"]["auc"])
        if not search.keep_weights:
            drop_weights(folder)
        say(f"trial {trial.number}: mean fold AUC {100 * value:.2f} "
            f"(pooled {100 * metrics['pooled_validation']['auc']:.2f})")
        return value

    study.optimize(objective, n_trials=n_trials, gc_after_trial=True)


def run_search(search: Search, jobs: int, devices: Sequence[str]) -> Path:
    """Check everything, then run the trials still missing from the budget (here or in ``jobs`` workers); write the outputs."""
    from hsqformer.training.engine import prepare_inputs

    prepare_inputs(search.base, search.data, {})  # the data and every image, before anything is written
    with search_lock(search.out):
        write_json(search.out / TUNE_FILE, _record(search))
        study = load_study(search)
        if search.start_from_base and not study.trials:
            study.enqueue_trial(base_params(search), user_attrs={"base": True})
            say("trial 0 is the base config's own settings (--start-from-base)")
        retried = recover_interrupted(study)
        if retried:
            which = f"trials {', '.join(map(str, retried))} were" if len(retried) > 1 else f"trial {retried[0]} was"
            say(f"{which} interrupted: run again with the same settings, resuming their cv runs")
        remaining = search.trials - finished_trials(study)
        say(f"{finished_trials(study)} of {search.trials} trials finished earlier; {max(0, remaining)} to run")
        if remaining > 0 and jobs == 1 and not devices:
            run_trials(search, remaining)
        elif remaining > 0:
            _run_workers(search, remaining, jobs, devices)
        return write_results(search, load_study(search))


def _run_workers(search: Search, remaining: int, jobs: int, devices: Sequence[str]) -> None:
    args = ["tune", "--config", str(search.config), "--space", str(search.space.path), "--trials", str(search.trials),
            "--data", search.data, "--out", str(search.out), "--seed", str(search.seed)]
    args += [item for override in search.overrides for item in ("--set", override)]
    args += ["--keep-weights"] if search.keep_weights else []
    args += ["--start-from-base"] if search.start_from_base else []
    workers = min(jobs, remaining)
    shares = [remaining // workers + (1 if w < remaining % workers else 0) for w in range(workers)]
    job_list = [
        Job(f"worker {w} ({share} trial{'s' if share > 1 else ''})", [*args, "--worker", str(w), "--worker-trials", str(share)],
            search.out / LOGS_DIR / f"worker_{w}.log")
        for w, share in enumerate(shares)
    ]

    def ended(job: Job, status: int) -> None:
        say(f"{job.label}: {'finished' if status == 0 else f'failed (exit status {status}): {log_tail(job.log)}'}")

    failed = run_jobs(job_list, workers, devices, ended, say)
    if failed:
        job = failed[0][0]
        raise HSQformerError(f"{len(failed)} of {workers} workers failed; {job.label}: {log_tail(job.log)} (see {job.log})")


def write_results(search: Search, study: optuna.Study) -> Path:
    """best.yaml, trials.csv, history.png and report.md from the study; returns report.md's path."""
    trials = study.get_trials(deepcopy=False)
    write_csv(search.out / "trials.csv", _trials_table(trials))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    if best is not None:
        cfg = apply_settings(config_to_dict(search.base), best.user_attrs["settings"], f"trial {best.number}")
        header = (
            f"# Best of {len(complete)} complete trials of hsqformer tune in {search.out}: trial {best.number}, mean fold "
            f"validation AUC {100 * best.value:.2f}.\n# Base config {search.config} with: "
            f"{' '.join(set_arguments(best.user_attrs['settings'])[1::2])}\n"
            f"# Final cross-validation: hsqformer cv --config {search.out / 'best.yaml'} --data DATA [--test NAME=DATA] --out RUN\n"
        )
        write_text(search.out / "best.yaml", header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    _history_figure(trials, search.out / "history.png")
    return write_text(search.out / "report.md", _markdown(search, trials, best))


def _trials_table(trials: Sequence[FrozenTrial]) -> pd.DataFrame:
    rows = []
    for t in trials:
        settings = t.user_attrs.get("settings", {})
        rows.append({
            "trial": t.number,
            "state": t.state.name.lower(),
            "mean_fold_auc": t.value if t.state == TrialState.COMPLETE else None,
            "pooled_auc": t.user_attrs.get("pooled_auc"),
            "last_reported_auc": t.intermediate_values.get(t.last_step) if t.last_step is not None else None,
            "fold_aucs": " ".join(f"{a:.4f}" for a in t.user_attrs.get("fold_aucs", []) if a is not None),
            "last_step": t.last_step,
            "retry_of": t.user_attrs.get("retry_of"),
            "base": bool(t.user_attrs.get("base", False)),
            "minutes": round(t.duration.total_seconds() / 60, 2) if t.duration else None,
            **{key: yaml_text(value) for key, value in settings.items()},
        })
    table = pd.DataFrame(rows)
    if "retry_of" in table:
        table["retry_of"] = table["retry_of"].astype("Int64")
    return table


def _history_figure(trials: Sequence[FrozenTrial], path: Path) -> Path:
    from hsqformer.evaluation.figures import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    ax.plot([t.number for t in complete], [100 * t.value for t in complete], "o", label="complete: mean fold AUC")
    ax.plot([t.number for t in pruned], [100 * t.intermediate_values[t.last_step] for t in pruned], "x",
            color="grey", label="pruned: last reported AUC")
    if complete:
        best, xs, ys = -math.inf, [], []
        for t in complete:
            best = max(best, t.value)
            xs.append(t.number)
            ys.append(100 * best)
        ax.step(xs, ys, where="post", color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel="validation AUC (%)")
    ax.set_title("hsqformer tune: objective per trial", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _markdown(search: Search, trials: Sequence[FrozenTrial], best: FrozenTrial | None) -> str:
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    n_folds = search.base.cv.n_folds
    lines = [
        f"# Hyper-parameter search: {search.config}",
        "",
        f"Data: `{Path(search.data).resolve()}` (training data only; no test cohort is read). Space: `{search.space.path}`"
        + (f" (skipped, the model lacks them: {', '.join(search.space.skipped)})" if search.space.skipped else "") + ".",
        "",
        (
            f"Objective: the mean over the {n_folds} patient-level folds of each fold's validation AUC (its best "
            f"epoch), maximised by Optuna's TPE sampler (seed {search.seed}; the first {search.startup_trials()} "
            "trials at random)"
        )
        + (f", with median pruning on each epoch's best-so-far validation AUC (not before {search.startup_trials()} "
           f"trials finished, nor in the first {search.base.trainer.epochs // 2} epochs of fold 0)."
           if search.space.pruning else ", without pruning.")
        + (" Trial 0 is the base config's own settings (`--start-from-base`), counted among the startup trials."
           if search.start_from_base else ""),
        "",
        (
            f"Budget: {search.trials} trials (complete + pruned). Now: {counts[TrialState.COMPLETE]} complete, "
            f"{counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed or interrupted"
            f"{f', {counts[TrialState.RUNNING]} running' if counts[TrialState.RUNNING] else ''}."
        ),
        "",
    ]
    if best is not None:
        settings = " ".join(set_arguments(best.user_attrs["settings"])[1::2])
        lines += [
            (
                f"**Best: trial {best.number}**, mean fold AUC {100 * best.value:.2f} (pooled out-of-fold AUC "
                f"{100 * best.user_attrs['pooled_auc']:.2f}): `{settings}`. Its complete config is [best.yaml](best.yaml)."
            ),
            "",
            (
                f"The best of {counts[TrialState.COMPLETE]} trials judged on the same folds is optimistic (chosen for "
                "being highest); judge the final model, trained with best.yaml, on a test cohort."
            ),
            "",
        ]
    lines += ["![objective per trial](history.png)", "", _table(trials, search)]
    return "\n".join(lines) + "\n"


def _table(trials: Sequence[FrozenTrial], search: Search) -> str:
    names = [p.name for p in search.space.params]
    head = ["trial", "state", "mean fold AUC", "pooled AUC", *names, "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number))
    for t in [*complete, *(t for t in trials if t.state != TrialState.COMPLETE)]:
        pooled = t.user_attrs.get("pooled_auc")
        pruned = t.state == TrialState.PRUNED and t.last_step is not None
        cells = [
            str(t.number) + (" (base config)" if t.user_attrs.get("base") else ""),
            t.state.name.lower()
            + (f" at step {t.last_step} (AUC {100 * t.intermediate_values[t.last_step]:.2f})" if pruned else ""),
            f"{100 * t.value:.2f}" if t.state == TrialState.COMPLETE else "",
            f"{100 * pooled:.2f}" if pooled is not None else "",
            *(_param_text(t.params.get(name)) for name in names),
            f"{t.duration.total_seconds() / 60:.1f}" if t.duration else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _param_text(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
