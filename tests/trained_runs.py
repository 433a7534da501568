"""Small finished ``hsqformer cv`` runs with real weights, trained once per test session (per xdist worker).

The tests of what uses a trained run (explain, serve, export) need real models, not their outputs only
(run_fixtures.py writes those): the smoke recipe (configs/smoke.yaml: HSQformer-S with tiny backbones,
64-pixel inputs, 2 folds of 1 epoch) on 40 images of the embedded BUSI sample, and the same for a plain
timm baseline (EfficientNet-Lite0 alone). Each takes a few seconds to tens of seconds on 2 cores.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from hsqformer.cli import main
from shared_data import SAMPLE

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"

#: ``--set`` overrides that turn the smoke recipe into a baseline run of one timm model.
BASELINE = ("model.name=tf_efficientnet_lite0", "model.pretrained=true", "model.kwargs={}")


def train_smoke_run(out: Path, *overrides: str) -> Path:
    """Train the smoke recipe (plus ``overrides``, ``KEY=VALUE``) on the embedded sample into ``out``."""
    args = ["cv", "--config", SMOKE, "--data", SAMPLE, "--out", out]
    for item in overrides:
        args += ["--set", item]
    err = io.StringIO()
    argv = sys.argv
    sys.argv = ["hsqformer", *map(str, args)]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(f"training the test run {out} failed:\n{err.getvalue()[-3000:]}") from None
    finally:
        sys.argv = argv
    return out
