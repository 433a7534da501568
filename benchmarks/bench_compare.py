"""How long ``hsqformer compare`` takes: 10 models x 3 cohorts x 10,000 images.

Run from the repository root:

    .venv/bin/python benchmarks/bench_compare.py --out benchmarks/results/compare_speed.md

Writes synthetic finished run folders (the format ``hsqformer cv`` writes, scores drawn from a
binormal model) into a temporary folder, then times, separately: reading the runs, the
statistics (DeLong for all models at once per cohort, 2,000 patient-bootstrap resamples at two
thresholds per model and cohort, McNemar and Holm), and the figures and files.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import markdown_header  # noqa: E402
from hsqformer.evaluation.compare import compare_runs, load_run  # noqa: E402
from hsqformer.evaluation.comparison_report import write_comparison  # noqa: E402
from run_fixtures import synthetic_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        separations = {f"model{i}": 0.8 + 0.1 * i for i in range(args.models)}
        paths = synthetic_study(
            Path(tmp) / "runs", separations, n=args.images,
            test_sizes={"multi-center": args.images, "high-risk": args.images}, shared=0.5,
        )
        timings = {}
        start = time.perf_counter()
        runs = [load_run(p) for p in paths]
        timings["read the runs"] = time.perf_counter() - start
        start = time.perf_counter()
        report = compare_runs(runs, n_resamples=args.resamples)
        timings["statistics"] = time.perf_counter() - start
        start = time.perf_counter()
        write_comparison(runs, report, Path(tmp) / "report")
        timings["figures and files"] = time.perf_counter() - start
    lines = [markdown_header("hsqformer compare: time of one report")]
    lines.append(
        f"\n{args.models} models x 3 cohorts (validation + 2 test cohorts) x {args.images:,} images, "
        f"{args.resamples} patient-bootstrap resamples, one image per patient.\n"
    )
    lines.append("| step | seconds |\n|---|---|")
    lines += [f"| {step} | {seconds:.1f} |" for step, seconds in timings.items()]
    lines.append(f"| total | {sum(timings.values()):.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-6:]))


if __name__ == "__main__":
    main()
