"""Where the tests find images: the real sets beside the repository, or the sample shipped in the package.

The real sets (liver-sysu, busi) live in ``../shared/data`` next to the repository, or wherever the
environment variable ``HSQFORMER_SHARED_DATA`` points. A clone without them still runs every test that
needs only *some* ultrasound images, on the embedded BUSI sample (``hsqformer.sample_data``); tests that
need the real sets are marked ``@requires_shared_data`` and skipped there (conftest.py says how many,
once, at the end of the session). ``HSQFORMER_SHARED_DATA=/nonexistent pytest ...`` simulates such a clone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hsqformer import sample_data

REPO = Path(__file__).resolve().parents[1]
ENV_VAR = "HSQFORMER_SHARED_DATA"
DATA = Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else REPO.parent / "shared" / "data"
HAS_SHARED_DATA = DATA.is_dir()
SKIP_REASON = "needs ../shared/data (real data); skipped on a clone without it"

#: Mark a test (or, as ``pytestmark``, a module) that reads the real sets; conftest.py skips it without them.
requires_shared_data = pytest.mark.requires_shared_data

#: The embedded sample: 50 benign + 50 malignant BUSI images, 128x128 grayscale, no patient ids.
SAMPLE = sample_data.path()


def sample_images(label: str, n: int, start: int = 0) -> list[Path]:
    """``n`` images of class ``label`` of the embedded sample, from position ``start``, in manifest order."""
    rows = [line.split(",") for line in sample_data.manifest().read_text(encoding="utf-8").splitlines()[1:]]
    paths = [SAMPLE / path for path, row_label, *_ in rows if row_label == label]
    if start + n > len(paths):
        raise ValueError(f"the sample has {len(paths)} {label} images, asked for {start}..{start + n}")
    return paths[start:start + n]
