"""Lightning's CSV metrics log, made crash-safe.

Lightning rewrites ``metrics.csv`` in place whenever a new metric name appears (its header changes),
first truncating the file: a run killed in that moment loses the whole log of the epochs before.
Here the rewrite goes through a temporary file moved over the old one, so the log on disk is always
either the old one or the new one.
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from hsqformer.files import atomic_path


class DurableExperimentWriter(ExperimentWriter):
    """Lightning's writer of ``metrics.csv`` with an atomic header rewrite."""

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
        with atomic_path(self.metrics_file_path) as tmp, tmp.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


class DurableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a crash at any moment (see the module's docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> DurableExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = DurableExperimentWriter(log_dir=self.log_dir)
        return self._experiment
