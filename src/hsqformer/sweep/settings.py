"""Settings of a grid point or a search trial: values of dotted config keys applied to a base config.

A sweep point and a search trial are both the base config with a few keys changed
(``optimizer.lr``, ``model.kwargs.num_queries``). Everything that can be wrong with such
settings is found here, before anything trains: a key that is not a config key or a value of the
wrong type (the config's own checks, ``config_from_dict``), a model setting the model rejects
(each distinct model is built on PyTorch's meta device: no memory, no weights, about a second),
and keys that would change the images or the folds, which every run of a grid or a search must
share to be compared paired on the same images.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from hsqformer.errors import HSQformerError
from hsqformer.training.config import Config, config_from_dict, config_to_dict

#: A point's or a trial's settings: dotted config key -> value, in the order given.
Settings = dict[str, Any]

#: Keys that decide which images are used and how they are split: the same for every run of a grid.
FIXED_KEYS = ("cv", "data.classes", "data.positive_class", "data.max_images")

_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def check_key(key: object, where: str) -> str:
    """``key`` if it is a dotted key that may vary; else a one-line error naming ``where``."""
    if not isinstance(key, str) or "." not in key or any(not part.strip() for part in key.split(".")):
        raise HSQformerError(
            f"{where}: {key!r} is not a dotted config key such as optimizer.lr or model.kwargs.num_queries"
        )
    for fixed in FIXED_KEYS:
        if key == fixed or key.startswith(fixed + "."):
            raise HSQformerError(
                f"{where}: '{key}' cannot vary: every run must use the same images and folds to be compared paired"
            )
    return key


def apply_settings(base: Mapping[str, Any], settings: Mapping[str, Any], where: str) -> Config:
    """The checked config of ``base`` (plain config data, ``config_to_dict``) with ``settings`` applied.

    ``model.kwargs.X`` adds or replaces one model argument and keeps the others.
    """
    raw = copy.deepcopy(dict(base))
    for key, value in settings.items():
        *sections, leaf = key.split(".")
        node = raw
        for depth, part in enumerate(sections):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise HSQformerError(f"{where}: '{'.'.join(sections[: depth + 1])}' in '{key}' is not a config section")
            node = child
        node[leaf] = copy.deepcopy(value)
    try:
        return config_from_dict(raw)
    except HSQformerError as err:
        raise HSQformerError(f"{where}: {err}") from None


def check_models(configs: Iterable[tuple[str, Config]]) -> None:
    """Build each distinct model of ``(where, config)`` pairs on the meta device; a rejected setting fails in one line.

    Pretrained weights are not read (the real run loads them and reports a missing file itself).
    """
    import torch

    from hsqformer.training.modeling import build_model

    seen: set[str] = set()
    for where, cfg in configs:
        kwargs = dict(cfg.model.kwargs)
        if "pretrained_backbones" in kwargs:
            kwargs["pretrained_backbones"] = False
        probe = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=False, kwargs=kwargs))
        identity = json.dumps([probe.model.name, kwargs, cfg.augment.img_size], sort_keys=True, default=repr)
        if identity in seen:
            continue
        seen.add(identity)
        try:
            with torch.device("meta"):
                build_model(probe, 2)
        except HSQformerError as err:
            raise HSQformerError(f"{where}: {err}") from None


def comparable(cfg: Config) -> dict[str, Any]:
    """The config as plain data, with an HSQformer variant's model arguments completed by their defaults.

    A point that spells out a default (``model.kwargs.attn_order: serial``) is then the same run as
    the base config that leaves it out, and is trained once.
    """
    import inspect

    from hsqformer.models.hsqformer import VARIANTS, HSQformer

    plain = config_to_dict(cfg)
    if cfg.model.name in VARIANTS:
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(HSQformer.__init__).parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }
        arguments = {**defaults, **VARIANTS[cfg.model.name], **cfg.model.kwargs}
        plain["model"]["kwargs"] = json.loads(json.dumps(arguments, default=repr))  # tuples as lists
    return plain


def value_label(value: Any) -> str:
    """A short label of a value for tables, figures and folder names (block counts read 2:2:6:2)."""
    if isinstance(value, bool) or value is None:
        return yaml_text(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return ":".join(str(v) for v in value)
    if isinstance(value, (list, dict)):
        return yaml_text(value)
    return str(value)


def yaml_text(value: Any) -> str:
    """``value`` as one line of YAML, the form ``hsqformer cv --set KEY=VALUE`` reads back."""
    return yaml.safe_dump(value, default_flow_style=True, width=1_000_000).splitlines()[0]


def set_arguments(settings: Mapping[str, Any]) -> list[str]:
    """``--set KEY=VALUE`` arguments that reproduce ``settings`` on the command line."""
    return [item for key, value in settings.items() for item in ("--set", f"{key}={yaml_text(value)}")]


def slug(text: str) -> str:
    """``text`` as a folder name: letters, digits, '.', '_' and '-' only."""
    return _SLUG_UNSAFE.sub("-", text).strip("-.") or "point"


def drop_weights(run: Path) -> int:
    """Delete the fold weights of a finished run folder (its predictions and metrics stay); returns bytes freed."""
    freed = 0
    for weights in run.glob("fold_*/model.safetensors"):
        freed += weights.stat().st_size
        weights.unlink()
    return freed


def read_yaml_file(path: Path, kind: str) -> Any:
    """The YAML content of a ``kind`` file ("grid", "space"); one-line errors name the file (and the line)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HSQformerError(f"{kind} file not found: {path}") from None
    except OSError as err:
        raise HSQformerError(f"cannot read {kind} file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise HSQformerError(f"{kind} file {path}{line}: {getattr(err, 'problem', None) or 'invalid YAML'}") from None
