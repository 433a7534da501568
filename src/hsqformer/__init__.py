"""HSQformer: Hierarchical Sparse Query Transformer for ultrasound HCC screening.

``import hsqformer`` is cheap: it imports neither torch nor timm, so that the command line
(``hsqformer --help``, ``audit``, ``dicom2png``) starts in a fraction of a second. The models are
still registered with timm whenever timm is there to register them with, so that

    import hsqformer
    import timm
    model = timm.create_model("hsqformer_base", num_classes=2)

works in either import order:

- timm already imported when ``hsqformer`` is: ``hsqformer.models`` is imported at once;
- timm imported later: an import hook imports ``hsqformer.models`` right after timm itself;
- ``import hsqformer.models`` (or ``from hsqformer.models import ...``, or the attributes
  ``hsqformer.HSQformer`` / ``hsqformer.models``) always registers every variant and baseline.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["HSQformer", "models", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from hsqformer import models as models
    from hsqformer.models import HSQformer as HSQformer

_MODELS = "hsqformer.models"


def __getattr__(name: str) -> Any:
    """``hsqformer.models`` and ``hsqformer.HSQformer``, imported (and registered with timm) on first use."""
    if name == "models":
        return importlib.import_module(_MODELS)
    if name == "HSQformer":
        return importlib.import_module(_MODELS).HSQformer
    raise AttributeError(f"module 'hsqformer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _register_with_timm() -> None:
    """Import ``hsqformer.models``, whose modules register the HSQformer variants and baselines with timm.

    Never makes the import of timm fail: a broken ``hsqformer.models`` becomes a warning here and
    raises again, with its traceback, where it is imported for use.
    """
    if _MODELS in sys.modules:  # imported, or being imported (this hook then fired from inside it)
        return
    try:
        importlib.import_module(_MODELS)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"hsqformer: could not register its models with timm: {err}", RuntimeWarning, stacklevel=2)


class _RegisterAfterTimm:
    """A ``sys.meta_path`` finder and loader that finds ``timm`` through the other finders and, once
    timm has run, registers the hsqformer models (duck-typed: importing importlib.abc costs 40 ms).

    It takes part in one import only: it leaves ``sys.meta_path`` when timm is found and gives the
    module its own loader back when timm has run.
    """

    def __init__(self) -> None:
        self._loader: Any = None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "timm":
            return None
        self.remove()
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        loader = self._loader
        module.__spec__.loader = loader
        module.__loader__ = loader
        loader.exec_module(module)
        _register_with_timm()

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


if "timm" in sys.modules:
    _register_with_timm()
elif not any(type(finder).__name__ == "_RegisterAfterTimm" for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())
