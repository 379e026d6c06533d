"""Local run logs: `metrics.jsonl` in the run folder, one line per batch that logged metrics.

Each line holds the batch, the tokens seen and every metric Composer logged at that batch
(train loss and metrics, lr, throughput, and eval metrics at eval batches). A resumed run first
drops the lines past the batch it resumes from, so after any number of kills the file has every
step exactly once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist


class MetricsFile(LoggerDestination):
    def __init__(self, path: Path):
        self.path = path
        self.row: dict[str, Any] = {}

    def fit_start(self, state: State, logger: Logger) -> None:
        self.row = {}
        if dist.get_global_rank() != 0 or not self.path.exists():
            return
        resumed = int(state.timestamp.batch)
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["batch"] <= resumed]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # Composer logs a batch's loss under the step before it and its lr under the step after,
        # so rows are cut at BATCH_CHECKPOINT (WriteMetricsRow), not by `step`.
        for key, value in metrics.items():
            value = float(value.item() if hasattr(value, "item") else value)
            self.row[key] = value if math.isfinite(value) else str(value)

    def write_row(self, state: State) -> None:
        """Append the batch's row: everything logged since the previous row."""
        if dist.get_global_rank() == 0 and self.row:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            row = {"batch": int(state.timestamp.batch), "tokens": int(state.timestamp.token), **self.row}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.row = {}


class WriteMetricsRow(Callback):
    """Writes the MetricsFile row at BATCH_CHECKPOINT, after the batch's train and eval logging.

    Composer runs plain callbacks before loggers at every event but INIT, so this must be a
    plain callback placed before the CheckpointSaver: then no checkpoint ever holds a batch
    whose row is not on disk yet (a logger's own batch_checkpoint would run after the saver).
    """

    def __init__(self, metrics_file: MetricsFile):
        self.metrics_file = metrics_file

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self.metrics_file.write_row(state)
