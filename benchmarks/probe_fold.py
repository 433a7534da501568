"""Train a single fold of a config and print its validation AUC per epoch: a quick probe when tuning a recipe.

One fold of liver-sysu is about a fifth of a full cross-validation, so recipes can be
compared in minutes before a whole benchmark is run; with ~100 validation images a
fold's AUC moves by several points between runs, so only large differences count.

    .venv/bin/python benchmarks/probe_fold.py --config configs/cpu.yaml \
        --data ../shared/data/liver-sysu --fold 1 --set optimizer.lr=5e-4

Writes the fold's model and Lightning log under ``--out``, which must not exist yet,
or by default under ``benchmarks/runs/probe/FOLD`` (git-ignored; replaced on each call).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from hsqformer.errors import HSQformerError
from hsqformer.training.config import load_config
from hsqformer.training.engine import prepare_inputs, train_fold

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE override")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        inputs = prepare_inputs(cfg, args.data, {})
        if not 0 <= args.fold < len(inputs.folds):
            raise HSQformerError(f"--fold must be in 0..{len(inputs.folds) - 1}, got {args.fold}")
        if args.out is not None and args.out.exists():
            raise HSQformerError(f"--out {args.out} already exists; choose a new folder")
        out = args.out or HERE / "runs" / "probe" / str(args.fold)
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        train_rows, val_rows = inputs.folds[args.fold]
        info = train_fold(args.fold, inputs, out, train_rows, val_rows)
    except HSQformerError as err:
        sys.exit(f"error: {err}")
    log = pd.read_csv(out / "logs" / "version_0" / "metrics.csv").dropna(subset=["val_auc"])
    curve = " ".join(f"{auc:.3f}" for auc in log["val_auc"])
    print(
        f"fold {args.fold}: best val AUC {info['val_auc']:.3f} at epoch {info['best_epoch']} "
        f"({time.perf_counter() - started:.0f} s); per epoch: {curve}; overrides: {' '.join(args.overrides) or '-'}"
    )


if __name__ == "__main__":
    main()
