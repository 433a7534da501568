"""Visual explanations of a finished run's predictions: Grad-CAM family maps and HSQformer's query attention.

``explain_image(ensemble, image)`` gives the heat map of one image for the fold ensemble of a run
(``hsqformer.training.inference.load_ensemble``): the mean of the fold models' maps, at the size of
the image as given, with the ensemble's positive-class probability. ``overlay`` blends a map onto its
image. The ``hsqformer explain`` command (``hsqformer.explain.cli``) writes them for files and folders.

Methods (``METHODS``):

* ``"gradcam"``, ``"gradcam++"``, ``"hirescam"``: the ``grad-cam`` package's GradCAM,
  GradCAMPlusPlus and HiResCAM on a target layer (``hsqformer.explain.cam``), explaining the log-odds
  of the positive class. For HSQformer the default layer is the projector's last block (its
  stride-32 latent tokens, the last place where the model's evidence from both backbones is laid
  out on the image grid; ``target="cnn"``/``"vit"``: a backbone's last stage); for a plain timm
  model its last feature stage.
* ``"attention"``: HSQformer only, its native evidence: the weights with which the learnable
  queries cross-attend to each stage's latent tokens (``hsqformer.explain.attention``), averaged
  over heads, queries and blocks, per stage; ``target="stage1"`` ... ``"stage4"`` shows one stage,
  the default their mean.

Importing this package is cheap (it imports neither numpy nor torch); they load on first use of
``explain_image`` or ``overlay``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from hsqformer.explain.explainer import explain_image as explain_image
    from hsqformer.explain.figures import overlay as overlay

__all__ = ["CAM_METHODS", "METHODS", "Explanation", "explain_image", "overlay"]

#: The Grad-CAM family methods, by the names the command line takes.
CAM_METHODS: tuple[str, ...] = ("gradcam", "gradcam++", "hirescam")
#: Every accepted method name: the CAM methods and HSQformer's query attention.
METHODS: tuple[str, ...] = (*CAM_METHODS, "attention")


@dataclass(frozen=True)
class Explanation:
    """The heat map of one image for a run's fold ensemble.

    ``heatmap`` is float32 (H, W) in [0, 1] at the size of the image that was explained; pixels the
    model never saw (cut off by the evaluation crop) are 0. ``probability`` is the ensemble's
    positive-class probability, the ``prob_ensemble`` of ``hsqformer predict``. ``target`` names the
    layer (or attention stages) the map comes from.

    For ``method="attention"`` only (empty for the CAM methods): ``parts`` holds each query stage's own
    map ("stage1" ... -> (H, W) in [0, 1]); ``density_range`` the (min, max) attention density of the
    heat map ("heatmap") and of each stage before they were stretched to [0, 1], where 1 is uniform
    attention: a stage at (0.97, 1.03) attends almost evenly however contrasted its stretched map looks.
    """

    image: str
    probability: float
    heatmap: np.ndarray
    method: str
    target: str = ""
    parts: Mapping[str, np.ndarray] = field(default_factory=dict)
    density_range: Mapping[str, tuple[float, float]] = field(default_factory=dict)


_LAZY = {"explain_image": "hsqformer.explain.explainer", "overlay": "hsqformer.explain.figures"}


def __getattr__(name: str) -> Any:
    """``explain_image`` and ``overlay``, imported (with torch / matplotlib) on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hsqformer.explain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
