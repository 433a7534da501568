"""A small, license-clean sample shipped inside the package: 100 BUSI breast ultrasound images.

``path()`` is the folder (``benign/``, ``malignant/``, ``manifest.csv``, ``ATTRIBUTION.md``) in the
project's dataset format, usable wherever a dataset is expected::

    hsqformer audit "$(python -c 'import hsqformer.sample_data as s; print(s.path())')"

50 benign and 50 malignant images of BUSI (Al-Dhabyani et al., Data in Brief 28, 2020; CC BY 4.0),
downscaled to 128x128 grayscale by ``tools/make_sample.py``; see ``busi/ATTRIBUTION.md``. There are
no patient identifiers, so splits are image-level. Meant for the demo, tests and trying the tools,
not for judging a model. This module imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["path", "manifest", "BUSI_CLASSES"]

BUSI_CLASSES = ("benign", "malignant")


def path(name: str = "busi") -> Path:
    """The folder of the embedded sample ``name`` (only ``busi`` for now)."""
    folder = Path(__file__).resolve().parent / name
    if not (folder / "manifest.csv").is_file():
        raise FileNotFoundError(f"no embedded sample '{name}' in {folder.parent} (is the package installed with its data?)")
    return folder


def manifest(name: str = "busi") -> Path:
    """The sample's ``manifest.csv`` (``path,label,patient_id,center``; paths relative to its folder)."""
    return path(name) / "manifest.csv"
