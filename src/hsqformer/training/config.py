"""Training configuration: YAML files with inheritance and dotted command-line overrides.

A config file is a YAML mapping with the sections below; any key left out keeps
its default (the defaults are the paper's Table 5 fine-tuning recipe for
HSQformer-B). ``extends: other.yaml`` (relative to the file) starts from another
file: mappings are merged key by key, except ``model.kwargs``, which a file
replaces whole because kwargs of one model rarely suit another. Overrides such
as ``trainer.epochs=2`` or ``model.kwargs.backbones=[resnet10t,resnet10t]`` are
parsed as YAML values and applied last. Every key and value is checked, and a
mistake is reported as one line naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from hsqformer.errors import HSQformerError

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


@dataclass
class DataConfig:
    """Which labels are used and how images are read."""

    classes: list[str] | None = None  # class order; None = sorted labels of the data
    positive_class: str | None = None  # class of the binary metrics; None = the second of two classes
    max_images: int | None = None  # class-stratified seeded subset of the training data (smoke runs)
    verify_images: bool = True
    num_workers: int = 4


@dataclass
class ModelConfig:
    """The network: any timm model name (HSQformer variants are registered on import)."""

    name: str = "hsqformer_base"
    pretrained: bool | str = False  # plain timm models: True or a weights file, via models.backbones
    aux_loss_weight: float = 0.01  # weight of ``model.aux_loss`` (MoE load balancing) in the loss
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AugmentConfig:
    """Input size, timm training/evaluation transforms, mixup/cutmix and label smoothing."""

    img_size: int = 224
    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.5
    vflip: float = 0.0
    auto_augment: str | None = "original"  # timm name of AutoAugment's ImageNet policy
    color_jitter: float = 0.0
    interpolation: str = "bicubic"
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    crop_pct: float = 1.0  # evaluation: resize to img_size / crop_pct, then centre crop
    crop_mode: str = "center"  # evaluation: center, squash or border (timm)
    mean: tuple[float, float, float] | None = None  # None = the model's pretrained config
    std: tuple[float, float, float] | None = None
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class OptimizerConfig:
    """timm ``create_optimizer_v2`` settings."""

    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    # learning rate of the backbone (HSQformer's CNN and ViT; a plain model's all but its classifier)
    # relative to ``lr``, as DETR trains its pretrained backbone slower than its new query transformer
    backbone_lr_scale: float = 1.0


@dataclass
class SchedulerConfig:
    """timm ``create_scheduler_v2`` settings, stepped every optimizer update."""

    name: str = "cosine"
    warmup_epochs: int = 1
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6


@dataclass
class EmaConfig:
    """Exponential moving average of the weights (timm ``ModelEmaV3``); validated and exported when on."""

    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = False  # timm's decay warm-up, for runs too short for the full decay


@dataclass
class TrainerConfig:
    """Lightning ``Trainer`` settings and batch sizes."""

    epochs: int = 20
    batch_size: int = 50
    eval_batch_size: int = 64
    precision: str = "auto"  # bf16 autocast where the hardware computes bf16 natively, else float32
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    deterministic: bool = False
    grad_checkpointing: bool = False
    log_every_n_steps: int = 10
    progress_bar: bool = True


@dataclass
class CVConfig:
    """Patient-level stratified K-fold cross-validation."""

    n_folds: int = 5
    seed: int = 0


@dataclass
class Config:
    """A whole training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cv: CVConfig = field(default_factory=CVConfig)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a config file (or the defaults when ``path`` is None) and apply ``key.path=value`` overrides."""
    raw = _read_with_extends(Path(path), ()) if path is not None else {}
    overridden = [_apply_override(raw, item) for item in overrides]

    def where(key: str) -> str:
        if any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in overridden):
            return " (from --set)"
        return f" (in {path})" if path is not None else ""

    cfg = _build(Config, raw, "", where)
    _check_values(cfg)
    return cfg


def config_from_dict(raw: Mapping[str, Any], where: str = "", overrides: Sequence[str] = ()) -> Config:
    """Build and check a ``Config`` from a plain mapping (e.g. a run folder's saved config) and overrides."""
    raw = _merge({}, raw)
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, "", lambda key: where)
    _check_values(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain YAML-safe data (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def first_difference(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> str | None:
    """The dotted key of the first value that differs between two plain configs, or None."""
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            found = first_difference(left, right, f"{prefix}{key}.")
            if found:
                return found
        elif left != right:
            return f"{prefix}{key}"
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HSQformerError(f"config file not found: {path}") from None
    except OSError as err:
        raise HSQformerError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise HSQformerError(f"config file {path}{line}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HSQformerError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        raise HSQformerError(f"config file {path}: 'extends' loops back to {chain[0]}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise HSQformerError(f"config file {path}: 'extends' must be a file name, got {parent!r}")
    base = _read_with_extends(path.parent / parent, (*chain, resolved))
    return _merge(base, data)


def _merge(base: dict[str, Any], top: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        dotted = f"{prefix}{key}"
        if dotted != "model.kwargs" and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value, f"{dotted}.")
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Set the dotted key of a ``KEY=VALUE`` item in ``raw``; returns the key."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise HSQformerError(f"override '{item}': expected KEY=VALUE with a dotted key, e.g. trainer.epochs=2")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise HSQformerError(f"override '{item}': value is not valid YAML") from None
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise HSQformerError(f"override '{item}': '{'.'.join(parts[: depth + 1])}' is not a section")
        node = child
    node[parts[-1]] = value
    return key


def _build(cls: type, raw: Any, prefix: str, where: Callable[[str], str]) -> Any:
    name = prefix.rstrip(".") or "config"
    if not isinstance(raw, Mapping):
        raise HSQformerError(f"config key '{name}'{where(name)}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            guess = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"; did you mean '{prefix}{guess[0]}'?" if guess else f"; valid keys: {', '.join(sorted(fields))}"
            raise HSQformerError(f"unknown config key '{prefix}{key}'{where(prefix + str(key))}{hint}")
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, f"{prefix}{key}.", where)
        else:
            values[key] = _coerce(value, hint, f"{prefix}{key}", where(f"{prefix}{key}"))
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check ``value`` against a type hint and return it in that type (ints pass for floats)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _coerce(value, option, key, where)
            except HSQformerError as err:
                errors.append(err)
        raise errors[-1] if len(errors) == 1 else _type_error(key, where, _describe(hint), value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, where, "true or false", value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, where, "an integer", value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, where, "a number", value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, where, "a string", value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _type_error(key, where, f"a list of {len(args)} numbers", value)
        return tuple(_coerce(item, arg, key, where) for item, arg in zip(value, args, strict=True))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, where, "a list", value)
        return [_coerce(item, args[0], key, where) for item in value]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise _type_error(key, where, "a mapping", value)
        return dict(value)
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _describe(hint: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return " or ".join(names.get(arg, "a list") for arg in typing.get_args(hint))


def _type_error(key: str, where: str, expected: str, value: Any) -> HSQformerError:
    return HSQformerError(f"config key '{key}'{where}: expected {expected}, got {value!r}")


def _check_values(cfg: Config) -> None:
    """Range checks that types alone cannot express."""

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise HSQformerError(f"config key '{key}': {message}")

    a, t = cfg.augment, cfg.trainer
    require(cfg.cv.n_folds >= 2, "cv.n_folds", f"must be at least 2, got {cfg.cv.n_folds}")
    require(t.epochs >= 1, "trainer.epochs", f"must be at least 1, got {t.epochs}")
    require(t.batch_size >= 1, "trainer.batch_size", f"must be at least 1, got {t.batch_size}")
    require(t.eval_batch_size >= 1, "trainer.eval_batch_size", f"must be at least 1, got {t.eval_batch_size}")
    require(t.precision in PRECISIONS, "trainer.precision", f"must be one of {', '.join(PRECISIONS)}")
    require(t.log_every_n_steps >= 1, "trainer.log_every_n_steps", "must be at least 1")
    require(cfg.data.num_workers >= 0, "data.num_workers", "must not be negative")
    require(cfg.data.max_images is None or cfg.data.max_images >= 2, "data.max_images", "must be at least 2")
    require(a.img_size >= 16, "augment.img_size", f"must be at least 16, got {a.img_size}")
    require(0 < a.scale[0] <= a.scale[1] <= 1, "augment.scale", f"needs 0 < min <= max <= 1, got {list(a.scale)}")
    require(0 < a.ratio[0] <= a.ratio[1], "augment.ratio", f"needs 0 < min <= max, got {list(a.ratio)}")
    require(0 < a.crop_pct <= 1, "augment.crop_pct", f"must be in (0, 1], got {a.crop_pct}")
    require(a.crop_mode in ("center", "squash", "border"), "augment.crop_mode", "must be center, squash or border")
    for key in ("hflip", "vflip", "re_prob", "mixup_prob", "mixup_switch_prob"):
        require(0 <= getattr(a, key) <= 1, f"augment.{key}", f"must be in [0, 1], got {getattr(a, key)}")
    require(0 <= a.label_smoothing < 1, "augment.label_smoothing", "must be in [0, 1)")
    require(a.mixup >= 0 and a.cutmix >= 0, "augment.mixup", "mixup and cutmix alphas must not be negative")
    require(cfg.optimizer.lr > 0, "optimizer.lr", f"must be positive, got {cfg.optimizer.lr}")
    require(cfg.optimizer.weight_decay >= 0, "optimizer.weight_decay", "must not be negative")
    require(cfg.optimizer.backbone_lr_scale >= 0, "optimizer.backbone_lr_scale", "must not be negative")
    require(cfg.scheduler.warmup_epochs >= 0, "scheduler.warmup_epochs", "must not be negative")
    require(0 < cfg.ema.decay < 1, "ema.decay", f"must be in (0, 1), got {cfg.ema.decay}")
    require(cfg.model.aux_loss_weight >= 0, "model.aux_loss_weight", "must not be negative")
    if mixup_enabled(cfg):
        require(t.batch_size % 2 == 0, "trainer.batch_size", f"must be even with mixup/cutmix, got {t.batch_size}")


def mixup_enabled(cfg: Config) -> bool:
    """Whether batches are mixed (timm Mixup needs even batch sizes and soft targets)."""
    return cfg.augment.mixup_prob > 0 and (cfg.augment.mixup > 0 or cfg.augment.cutmix > 0)
