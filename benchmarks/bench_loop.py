"""What the training framework costs: one epoch of a bare PyTorch loop against the same epoch through Lightning.

Run from the repository root:

    .venv/bin/python benchmarks/bench_loop.py --out benchmarks/results/loop_overhead_cpu_<kind>.md

The same model (configs/cpu.yaml's HSQformer-S, or any config), the same DataLoader (the run's
training transform over real images), the same timm optimizer, schedule and loss, from the same
initial weights, for the same number of updates:

* ``bare``: ``for images, targets in loader``: loss (with the MoE's auxiliary loss), backward, step,
  timm's ``step_update``: the least a training loop has to do;
* ``lightning``: ``ClassifierModule`` under ``L.Trainer`` with no logger, checkpoint or progress bar;
* ``engine``: as ``hsqformer cv`` trains a fold: the CSV log, the per-epoch checkpoint and the
  progress bar on top (validation is left out of all three: it is the same work in each).

Issue 16 asks the framework to cost at most 25 % of an epoch (``engine`` / ``bare`` <= 1.25).
``--device cpu`` (default) compares fp32 loops; ``--device cuda`` runs all three on the GPU at the precision
``hsqformer cv`` picks there (bf16 autocast where the GPU has it), e.g. with more images and the run's batch:

    python benchmarks/bench_loop.py --device cuda --images 384 --out loop_overhead_cuda.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_device, device_name, markdown_header  # noqa: E402
from hsqformer.data import UltrasoundDataset, class_names, load_dataset  # noqa: E402
from hsqformer.hardware import BF16, FP32, resolve_precision  # noqa: E402
from hsqformer.sample_data import path as sample_path  # noqa: E402
from hsqformer.training.config import load_config  # noqa: E402
from hsqformer.training.modeling import build_model  # noqa: E402
from hsqformer.training.module import ClassifierModule  # noqa: E402
from hsqformer.training.transforms import preprocess_config, train_transform  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def loader_for(cfg, model, data: Path) -> tuple[DataLoader, list[str]]:
    frame = load_dataset(data, cfg.data.classes)
    classes = list(cfg.data.classes or class_names(frame))
    frame = frame.sample(frac=1.0, random_state=0).iloc[: cfg.data.max_images] if cfg.data.max_images else frame
    dataset = UltrasoundDataset(frame, classes, train_transform(cfg.augment, preprocess_config(cfg.augment, model)))
    workers = cfg.data.num_workers
    loader = DataLoader(
        dataset, batch_size=cfg.trainer.batch_size, shuffle=True, drop_last=True, num_workers=workers,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0),
    )
    return loader, classes


def bare_epoch(module: ClassifierModule, loader: DataLoader, epochs: int, device: torch.device, precision: str) -> float:
    """Seconds per epoch of the plain loop (the module supplies only its loss and its optimizer recipe)."""

    class Steps:  # what configure_optimizers reads from its trainer
        estimated_stepping_batches = len(loader) * epochs

    module.trainer = Steps()  # type: ignore[assignment]
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    module.to(device)
    module.model.train()
    cuda = device.type == "cuda"
    updates, times = 0, []
    for _ in range(epochs):
        start = time.perf_counter()
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=cuda), targets.to(device, non_blocking=cuda)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == BF16):
                loss, _ = module.compute_loss(images, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def lightning_epoch(
    module: ClassifierModule, loader: DataLoader, epochs: int, device: torch.device, precision: str, *, like_engine: bool
) -> float:
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from hsqformer.training.csv_log import DurableCSVLogger
    from hsqformer.training.module import CompactProgressBar

    class EpochTimes(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.times.append(time.perf_counter() - self.start)

    timer = EpochTimes()
    with tempfile.TemporaryDirectory() as folder:
        extra = (
            [ModelCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1), CompactProgressBar()]
            if like_engine
            else []
        )
        trainer = L.Trainer(
            max_epochs=epochs, precision=precision, accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=[device.index or 0] if device.type == "cuda" else 1, logger=DurableCSVLogger(folder)
            if like_engine else False, enable_checkpointing=like_engine, enable_progress_bar=like_engine,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=folder,
            log_every_n_steps=module.cfg.trainer.log_every_n_steps, callbacks=[timer, *extra],
        )
        trainer.fit(module, loader)
    return min(timer.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cpu.yaml")
    parser.add_argument("--data", type=Path, default=sample_path(), help="Images (default: the embedded sample).")
    parser.add_argument("--images", type=int, default=96, help="Training images (a multiple of the batch size).")
    parser.add_argument("--epochs", type=int, default=2, help="Epochs per loop; the fastest one counts.")
    parser.add_argument("--set", action="append", default=[], help="Config override KEY=VALUE.")
    parser.add_argument("--device", default="cpu", help="cpu (fp32 loops) or cuda[:N] (cv's precision there).")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    device = benchmark_device(args.device)
    on_cpu = device.type == "cpu"
    cfg = load_config(
        args.config,
        [f"data.max_images={args.images}", f"trainer.precision={FP32 if on_cpu else 'auto'}", *args.set],
    )
    precision = resolve_precision(cfg.trainer.precision, "cpu" if on_cpu else "cuda").precision
    if on_cpu and precision != FP32:
        raise SystemExit("error: on the CPU this benchmark compares fp32 loops")
    results = {}
    for name in ("bare", "lightning", "engine"):
        torch.manual_seed(0)
        model, _ = build_model(cfg, 2)
        loader, classes = loader_for(cfg, model, args.data)
        module = ClassifierModule(model, cfg, len(classes), classes.index(cfg.data.positive_class))
        if name == "bare":
            results[name] = bare_epoch(module, loader, args.epochs, device, precision)
        else:
            results[name] = lightning_epoch(module, loader, args.epochs, device, precision, like_engine=name == "engine")
        print(f"{name}: {results[name]:.2f} s per epoch ({len(loader)} updates)", file=sys.stderr)

    lines = [markdown_header("Training-loop overhead: bare PyTorch against Lightning"), ""]
    lines += [
        f"Config `{args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}`"
        f" with {' '.join(args.set) or 'no overrides'}; {args.images} training images from `{args.data.name}`,"
        f" batch {cfg.trainer.batch_size} ({len(loader)} updates per epoch), {cfg.augment.img_size} px, {precision}"
        f" on {device_name(device)},"
        f" {cfg.data.num_workers} loader workers; {args.epochs} epochs per loop, the fastest counts.",
        "",
        "| loop | s per epoch | vs bare |",
        "|---|---|---|",
    ]
    for name, seconds in results.items():
        lines.append(f"| {name} | {seconds:.2f} | {seconds / results['bare']:.3f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(args.out)


if __name__ == "__main__":
    main()
