"""Make the embedded BUSI sample: src/hsqformer/sample_data/busi/.

Picks 50 benign and 50 malignant images of BUSI (CC BY 4.0) deterministically, converts them to
128x128 8-bit grayscale PNGs (the busi copy is 256x256 RGB of grey ultrasound) and writes
manifest.csv and ATTRIBUTION.md. Running it again on the same input gives byte-identical files.

Selection: within each class, the images sorted by the SHA-256 of their content (a fixed, data-driven
shuffle that does not depend on file names or directory order), skipping any whose downscaled pixels
equal an image already taken (BUSI holds a few exact duplicates), until the class has its count.

    .venv/bin/python tools/make_sample.py                       # from ../shared/data/busi
    .venv/bin/python tools/make_sample.py --busi DIR --out DIR  # elsewhere
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import shutil
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUSI = ROOT.parent / "shared" / "data" / "busi"
DEFAULT_OUT = ROOT / "src" / "hsqformer" / "sample_data" / "busi"
SIZE = 128
PER_CLASS = {"benign": 50, "malignant": 50}

ATTRIBUTION = """\
# Embedded sample of BUSI (Dataset of Breast Ultrasound Images)

{n} images ({counts}) of the BUSI dataset, shipped so that `hsqformer demo` and the tests run on
a clone without any other data.

- Source: W. Al-Dhabyani, M. Gomaa, H. Khaled, A. Fahmy, "Dataset of breast ultrasound images",
  *Data in Brief* 28 (2020) 104863, https://doi.org/10.1016/j.dib.2019.104863
- License: Creative Commons Attribution 4.0 International (CC BY 4.0),
  https://creativecommons.org/licenses/by/4.0/
- Changes made here: a deterministic subset (`tools/make_sample.py`) of a public copy in which every
  image had been resized to 256x256 (aspect ratios distorted); the images were further **downscaled
  to {size}x{size} pixels and converted to 8-bit grayscale PNG**. Labels are BUSI's.
- BUSI has no patient identifiers (`patient_id` is empty in `manifest.csv`), so cross-validation
  on it splits images, not patients, and images of one woman can fall into different folds.

The rest of the hsqformer package is licensed Apache-2.0; this folder's images are CC BY 4.0.
"""


def downscale(path: Path) -> bytes:
    """The image as a {SIZE}x{SIZE} grayscale PNG, encoded reproducibly (no metadata, optimized)."""
    with Image.open(path) as image:
        grey = image.convert("L").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    grey.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busi", type=Path, default=DEFAULT_BUSI, help="the busi folder (class folders + manifest.csv)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to (re)create")
    args = parser.parse_args(argv)
    if not (args.busi / "manifest.csv").is_file():
        print(f"error: {args.busi / 'manifest.csv'} not found; pass --busi", file=sys.stderr)
        return 2

    with open(args.busi / "manifest.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    chosen: list[tuple[str, str, bytes]] = []  # (relative path, label, png bytes)
    for label, count in PER_CLASS.items():
        sources = [args.busi / row["path"] for row in rows if row["label"] == label]
        sources.sort(key=lambda p: hashlib.sha256(p.read_bytes()).hexdigest())
        taken: set[str] = set()
        for source in sources:
            png = downscale(source)
            with Image.open(io.BytesIO(png)) as image:
                pixels = hashlib.sha256(image.tobytes()).hexdigest()
            if pixels in taken:
                continue
            taken.add(pixels)
            # "benign (12).png" -> "benign_012.png": no spaces or parentheses in the package's file names
            number = int(source.stem.split("(")[1].rstrip(")"))
            chosen.append((f"{label}/{label}_{number:03d}.png", label, png))
            if len(taken) == count:
                break
        else:
            print(f"error: only {len(taken)} distinct {label} images in {args.busi}", file=sys.stderr)
            return 2

    if args.out.exists():
        shutil.rmtree(args.out)
    for label in PER_CLASS:
        (args.out / label).mkdir(parents=True)
    chosen.sort(key=lambda item: item[0])
    for relative, _, png in chosen:
        (args.out / relative).write_bytes(png)
    with open(args.out / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label", "patient_id", "center"])
        writer.writerows([relative, label, "", "BUSI"] for relative, label, _ in chosen)
    counts = ", ".join(f"{n} {label}" for label, n in PER_CLASS.items())
    (args.out / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(n=len(chosen), counts=counts, size=SIZE), encoding="utf-8")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{len(chosen)} images ({counts}) in {args.out}: {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
