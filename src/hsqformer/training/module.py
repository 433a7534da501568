"""The Lightning module that trains one classifier, and the callback that exports its best epoch.

Optimizer, schedule, mixup, loss and weight averaging are timm's; Lightning
supplies mixed precision, devices (DDP under torchrun), logging, progress bars
and resumable checkpoints. Validation AUC (the positive class against the rest)
is computed each epoch with torchmetrics, which also synchronises it across
processes; it decides which epoch is kept, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import RichProgressBar
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torchmetrics.classification import BinaryAUROC

from hsqformer.training.config import Config
from hsqformer.training.modeling import param_groups
from hsqformer.training.transforms import build_mixup


class ClassifierModule(L.LightningModule):
    """Trains ``model`` on ``(images, class indices)`` batches with the recipe of ``cfg``."""

    def __init__(self, model: nn.Module, cfg: Config, num_classes: int, positive_index: int) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.positive_index = positive_index
        self.mixup = build_mixup(cfg, num_classes)
        self.train_criterion: nn.Module = (
            SoftTargetCrossEntropy()
            if self.mixup is not None
            else nn.CrossEntropyLoss(label_smoothing=cfg.augment.label_smoothing)
        )
        self.ema = (
            ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) if cfg.ema.enabled else None
        )
        self.val_auc = BinaryAUROC()

    def eval_model(self) -> nn.Module:
        """The weights that are validated and exported: the moving average when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def compute_loss(
        self, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training loss of a batch (mixed when mixup is on) and the model's auxiliary loss, if any.

        The loss is the (soft-target or label-smoothed) cross-entropy plus
        ``model.aux_loss_weight`` times ``model.aux_loss`` when the model sets one.
        """
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        logits = self.model(images)
        loss = self.train_criterion(logits.float(), targets)
        aux = getattr(self.model, "aux_loss", None)
        if not isinstance(aux, torch.Tensor) or self.cfg.model.aux_loss_weight == 0:
            return loss, None
        return loss + self.cfg.model.aux_loss_weight * aux.float(), aux.detach().float()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, aux = self.compute_loss(*batch)
        if aux is not None:
            self.log("train_aux_loss", aux, on_step=True, on_epoch=True)
        self.log("train_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, targets = batch
        # float32 even under mixed precision: bf16 logits tie often enough to move the AUC that picks the epoch
        with torch.autocast(device_type=self.device.type, enabled=False):
            logits = self.eval_model()(images.float()).float()
        self.log("val_loss", F.cross_entropy(logits, targets), prog_bar=False, sync_dist=True)
        probs = logits.softmax(dim=1)[:, self.positive_index]
        self.val_auc.update(probs, (targets == self.positive_index).long())
        self.log("val_auc", self.val_auc, prog_bar=True, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> dict[str, Any]:
        o, s = self.cfg.optimizer, self.cfg.scheduler
        optimizer = create_optimizer_v2(
            param_groups(self.model, o.weight_decay, o.backbone_lr_scale),
            opt=o.name,
            lr=o.lr,
            weight_decay=o.weight_decay,
            betas=tuple(o.betas),
        )
        epochs = self.cfg.trainer.epochs
        updates_per_epoch = max(1, math.ceil(self.trainer.estimated_stepping_batches / epochs))
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=s.name,
            num_epochs=epochs,
            warmup_epochs=s.warmup_epochs,
            warmup_lr=s.warmup_lr,
            min_lr=s.min_lr,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
        )
        scheduler.step_update(num_updates=0)  # the first update already uses each group's scaled rate
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # timm schedulers are stepped by update count rather than through torch's LRScheduler API
        scheduler.step_update(num_updates=self.global_step)


class ExportBest(L.Callback):
    """After each validation, hand the evaluated weights to ``save`` when ``val_auc`` improved.

    Its best score is part of Lightning's checkpoint state, so a resumed fold keeps
    comparing against the epochs it ran before the interruption. A NaN AUC (a
    validation fold with one class) never counts as an improvement, but the first
    epoch is always exported so that every fold has a model.
    """

    def __init__(self, save: Callable[[nn.Module, float, int], None], monitor: str = "val_auc") -> None:
        self.save = save
        self.monitor = monitor
        self.best_score: float | None = None
        self.best_epoch: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        score = float(value) if value is not None else math.nan
        improved = self.best_score is None or (
            not math.isnan(score) and (math.isnan(self.best_score) or score > self.best_score)
        )
        if not improved:
            return
        self.best_score, self.best_epoch = score, trainer.current_epoch
        if trainer.is_global_zero:
            self.save(pl_module.eval_model(), score, trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_epoch = state_dict.get("best_epoch")


class StartEpoch(L.Callback):
    """Records the epoch at which ``fit`` starts: above 0 when a fold resumed from a checkpoint."""

    def __init__(self) -> None:
        self.epoch = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch = trainer.current_epoch


class CompactProgressBar(RichProgressBar):
    """Lightning's rich progress bar on one line of 80 columns: a short bar, batches, elapsed and remaining
    time, the step loss and the validation AUC (no speed, no ``v_num``, no epoch means that repeat them)."""

    SHOWN = {"train_loss_step": "loss", "val_auc": "val_auc"}

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        return {short: items[name] for name, short in self.SHOWN.items() if name in items}

    def configure_columns(self, trainer: L.Trainer) -> list:
        columns = [c for c in super().configure_columns(trainer) if type(c).__name__ != "ProcessingSpeedColumn"]
        for column in columns:
            if hasattr(column, "bar_width"):
                column.bar_width = 12
        return columns
