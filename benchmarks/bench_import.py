"""Start-up time of the command line: ``hsqformer --help``, ``import hsqformer`` and building the CLI app.

Each case runs in a fresh interpreter ``--runs`` times (median and min of the wall time); ``python -X importtime``
gives the import time of the modules, and a last run says whether torch got imported at all. ``--tree LABEL=SRC``
measures another source tree (e.g. a checkout of an older commit's ``src``) through PYTHONPATH, for before/after
tables; without it, the installed package is measured.

    .venv/bin/python benchmarks/bench_import.py --out benchmarks/results/import_time.md
    .venv/bin/python benchmarks/bench_import.py --tree before=/tmp/old/src --tree after=src --out ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_header  # noqa: E402

HSQFORMER = str(Path(sys.executable).with_name("hsqformer"))
CASES = {
    "`hsqformer --help`": [HSQFORMER, "--help"],
    "`python -c 'import hsqformer'`": [sys.executable, "-c", "import hsqformer"],
    "`python -c 'from hsqformer.cli import build_app; build_app()'`": [
        sys.executable, "-c", "from hsqformer.cli import build_app; build_app()"],
    "`python -c 'pass'` (the interpreter alone)": [sys.executable, "-c", "pass"],
}
IMPORTTIME = {
    "import hsqformer": "import hsqformer",
    "build the CLI app": "from hsqformer.cli import build_app; build_app()",
}
HEAVY = ("torch", "timm", "lightning", "pandas", "sklearn")


def env_for(src: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = str(Path(src).resolve()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def wall(command: list[str], env: dict[str, str], runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def import_seconds(code: str, env: dict[str, str]) -> float:
    """Sum of the cumulative times of the top-level imports that ``code`` makes, from ``-X importtime``."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env, check=True,
                            capture_output=True, text=True, timeout=600)
    total = 0
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (part for part in line.removeprefix("import time:").split("|"))
        if not name.startswith("  "):  # a top-level import (nested ones are indented further)
            total += int(cumulative)
    return total / 1e6


def heavy_modules(code: str, env: dict[str, str]) -> str:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules) or 'none')"
    result = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True,
                            timeout=600)
    return result.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tree", action="append", default=[], help="LABEL=SRC: measure SRC through PYTHONPATH")
    parser.add_argument("--notes", type=Path, help="Markdown file appended as the report's verdict")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "import_time.md")
    args = parser.parse_args()
    trees = [tuple(t.split("=", 1)) for t in args.tree] or [("installed", None)]

    load = os.getloadavg()
    lines = [markdown_header("Start-up time of the hsqformer command line"), ""]
    if args.notes:
        lines += [args.notes.read_text(encoding="utf-8").strip(), ""]
    lines += [f"Load average at start: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) on "
              f"{os.cpu_count()} cores. Wall times: median and min of {args.runs} fresh interpreters.", ""]
    lines += ["| tree | case | wall median (s) | wall min (s) |", "|---|---|---|---|"]
    for label, src in trees:
        env = env_for(src)
        for case, command in CASES.items():
            median, best = wall(command, env, args.runs)
            lines.append(f"| {label} | {case} | {median:.2f} | {best:.2f} |")
            print(lines[-1], flush=True)
    lines += ["", "| tree | imports | `-X importtime` total (s) | heavy modules imported |", "|---|---|---|---|"]
    for label, src in trees:
        env = env_for(src)
        for case, code in IMPORTTIME.items():
            lines.append(f"| {label} | {case} | {import_seconds(code, env):.3f} | {heavy_modules(code, env)} |")
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
