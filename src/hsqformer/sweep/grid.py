"""GRID.yaml: the points of an ablation, as named points and/or the product of settings.

```yaml
title: "Fig. 8: number of experts x routing"   # optional, heads the report
product:                                       # every combination, first key along the figures' x axis
  model.kwargs.num_experts: [2, 4, 8]          # a config key and its values
  routing:                                     # or an axis of named settings (a name without dots)
    top-1: {model.kwargs.top_k: 1}
    top-2: {model.kwargs.top_k: 2}
    dense: {model.kwargs.moe_mode: dense}
points:                                        # named points, run besides the product
  MLP: {model.kwargs.moe_mode: mlp}
axis: MoE                                      # optional: what the named points vary (figure label)
```

A config key's values may also be labelled (``model.kwargs.stage_depths: {"2:2:6:2": [2, 2, 6, 2]}``).
Every point is the base config with its settings applied. The base config itself is always a
point, the reference of the paired tests: a grid point with exactly the base config *is* that
point (it is trained once); otherwise a point named ``base`` is added first. Every point's config
is checked here (keys, types, ranges), so a mistake fails in one line before anything trains.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from hsqformer.errors import HSQformerError
from hsqformer.sweep.settings import Settings, apply_settings, check_key, comparable, slug, read_yaml_file, value_label
from hsqformer.training.config import Config, config_to_dict, first_difference

BASE_NAME = "base"
_GRID_KEYS = ("title", "product", "points", "axis")


@dataclass(frozen=True)
class Axis:
    """One dimension of the product: a label and the settings it stands for, per value."""

    name: str
    key: str | None  # the config key of a one-key axis; None for an axis of named settings
    labels: tuple[str, ...]
    settings: tuple[Settings, ...]

    def numbers(self) -> list[float] | None:
        """The values as numbers when the axis is one config key with numeric values (a line plot), else None."""
        if self.key is None:
            return None
        values = [s[self.key] for s in self.settings]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            return [float(v) for v in values]
        return None


@dataclass
class Point:
    """One cross-validation run of the grid."""

    name: str
    slug: str
    settings: Settings
    config: Config
    coords: dict[str, str] = field(default_factory=dict)  # product points: axis name -> label
    is_base: bool = False


@dataclass
class Grid:
    """A checked grid: its axes and every point, the base first when it is not a grid point."""

    path: Path
    title: str
    axis_title: str
    axes: list[Axis]
    points: list[Point]
    raw: dict[str, Any]

    @property
    def base(self) -> Point:
        return next(p for p in self.points if p.is_base)

    def extras(self) -> list[Point]:
        """The points off the product: named points, and the base when it is not a product point."""
        return [p for p in self.points if not p.coords]


def read_grid(path: str | Path, base: Config) -> Grid:
    """Read and check GRID.yaml against the base config; one-line errors name the file and the point."""
    path = Path(path)
    raw = read_yaml_file(path, "grid")
    where = f"grid {path}"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise HSQformerError(f"{where}: expected a mapping with 'points' and/or 'product', got {type(raw).__name__}")
    unknown = [key for key in raw if key not in _GRID_KEYS]
    if unknown:
        raise HSQformerError(f"{where}: unknown key '{unknown[0]}' (a grid has: {', '.join(_GRID_KEYS)})")
    axes = _read_product(raw.get("product"), where)
    named = _read_points(raw.get("points"), where)
    if not axes and not named:
        raise HSQformerError(f"{where}: the grid is empty; give 'points' (named settings) or 'product' (lists of values)")
    base_raw = config_to_dict(base)
    points: list[Point] = []
    for combination in itertools.product(*(range(len(axis.labels)) for axis in axes)) if axes else ():
        coords = {axis.name: axis.labels[i] for axis, i in zip(axes, combination, strict=True)}
        settings: Settings = {}
        for axis, i in zip(axes, combination, strict=True):
            settings.update(axis.settings[i])
        name = ", ".join(f"{axis}={label}" for axis, label in coords.items())
        folder = "_".join(slug(f"{axis}-{label}") for axis, label in coords.items())
        points.append(Point(name, folder, settings, apply_settings(base_raw, settings, f"{where}, point '{name}'"), coords))
    for name, settings in named.items():
        points.append(Point(name, slug(name), settings, apply_settings(base_raw, settings, f"{where}, point '{name}'")))
    _mark_base(points, base, where)
    _check_distinct(points, where)
    title = raw.get("title", path.stem)
    axis_title = raw.get("axis", "point")
    for key, text in (("title", title), ("axis", axis_title)):
        if not isinstance(text, str):
            raise HSQformerError(f"{where}: '{key}' must be a string, got {text!r}")
    return Grid(path, title, axis_title, axes, points, raw)


def _read_product(product: Any, where: str) -> list[Axis]:
    if product is None:
        return []
    if not isinstance(product, dict) or not product:
        raise HSQformerError(f"{where}: 'product' must map config keys to lists of values, got {product!r}")
    axes: list[Axis] = []
    for name, values in product.items():
        at = f"{where}, product '{name}'"
        if isinstance(name, str) and "." in name:
            key = check_key(name, at)
            if isinstance(values, list):
                labels = [value_label(v) for v in values]
                settings = [{key: v} for v in values]
            elif isinstance(values, dict):
                labels = [_label(label, at) for label in values]
                settings = [{key: v} for v in values.values()]
            else:
                raise HSQformerError(f"{at}: expected a list of values, got {values!r}")
        elif isinstance(name, str) and name.strip():
            if not isinstance(values, dict):
                raise HSQformerError(
                    f"{at}: an axis without a dot in its name maps labels to settings, e.g. top-1: {{model.kwargs.top_k: 1}}"
                )
            labels = [_label(label, at) for label in values]
            settings = [_settings(v, f"{at}, '{label}'") for label, v in values.items()]
            key = None
        else:
            raise HSQformerError(f"{where}: product key {name!r} is neither a config key nor an axis name")
        if not labels:
            raise HSQformerError(f"{at}: no values; an axis needs at least one")
        duplicate = next((label for label in labels if labels.count(label) > 1), None)
        if duplicate is not None:
            raise HSQformerError(f"{at}: the value '{duplicate}' appears twice")
        axes.append(Axis(name, key, tuple(labels), tuple(settings)))
    _short_axis_names(axes, where)
    return axes


def _short_axis_names(axes: list[Axis], where: str) -> None:
    """Name a one-key axis by the key's last part (num_queries) unless two axes would share it; no key twice."""
    seen: dict[str, str] = {}
    for axis in axes:
        for settings in axis.settings:
            for key in settings:
                if seen.setdefault(key, axis.name) != axis.name:
                    raise HSQformerError(f"{where}: '{key}' is set by two product axes ('{seen[key]}', '{axis.name}')")
    short = [axis.key.rsplit(".", 1)[-1] if axis.key else axis.name for axis in axes]
    for i, axis in enumerate(axes):
        if short.count(short[i]) == 1:
            axes[i] = Axis(short[i], axis.key, axis.labels, axis.settings)


def _read_points(points: Any, where: str) -> dict[str, Settings]:
    if points is None:
        return {}
    if not isinstance(points, dict) or not points:
        raise HSQformerError(f"{where}: 'points' must map point names to settings, got {points!r}")
    return {_label(name, f"{where}, points"): _settings(s, f"{where}, point '{name}'") for name, s in points.items()}


def _label(label: Any, where: str) -> str:
    if not isinstance(label, (str, int, float)) or isinstance(label, bool) or not str(label).strip():
        raise HSQformerError(f"{where}: label {label!r} must be a name (quote words YAML reads as true/false/null)")
    return str(label)


def _settings(value: Any, where: str) -> Settings:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HSQformerError(f"{where}: expected settings such as {{model.kwargs.top_k: 2}}, got {value!r}")
    return {check_key(key, where): item for key, item in value.items()}


def _mark_base(points: list[Point], base: Config, where: str) -> None:
    """The point with the base config becomes the reference; without one, a ``base`` point comes first."""
    base_plain = comparable(base)
    for point in points:
        if first_difference(comparable(point.config), base_plain) is None:
            point.is_base = True
            return
    if any(point.name == BASE_NAME or point.slug == BASE_NAME for point in points):
        raise HSQformerError(f"{where}: the name '{BASE_NAME}' is kept for the base config, and that point changes it")
    points.insert(0, Point(BASE_NAME, BASE_NAME, {}, base, is_base=True))


def _check_distinct(points: list[Point], where: str) -> None:
    folders: dict[str, str] = {}
    configs: list[tuple[str, dict[str, Any]]] = []
    for point in points:
        earlier = folders.setdefault(point.slug.lower(), point.name)
        if earlier != point.name:
            raise HSQformerError(f"{where}: points '{earlier}' and '{point.name}' would share the folder '{point.slug}'")
        plain = comparable(point.config)
        same = next((name for name, other in configs if first_difference(plain, other) is None), None)
        if same is not None:
            raise HSQformerError(f"{where}: points '{same}' and '{point.name}' have the same config; keep one")
        configs.append((point.name, plain))
