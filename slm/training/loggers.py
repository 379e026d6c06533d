"""Run logs: `metrics.jsonl` in the run folder, one line per batch that logged metrics; the W&B run id.

Each line holds the batch, the tokens seen and every metric Composer logged at that batch
(train loss and metrics, lr, throughput, and eval metrics at eval batches). A resumed run first
drops the lines past the batch it resumes from, so after any number of kills the file has every
step exactly once.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from pathlib import Path
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist


class MetricsFile(LoggerDestination):
    """Composer logger writing the run's metrics.jsonl, a row per batch that logs."""
    def __init__(self, path: Path):
        self.path = path
        self.row: dict[str, Any] = {}
        self.latest: dict[str, Any] = {}  # the newest value of every metric so far (for model cards)

    def fit_start(self, state: State, logger: Logger) -> None:
        # `latest` comes back with the checkpoint (RunInfo), so the rows are not read again.
        self.row = {}
        if dist.get_global_rank() == 0 and self.path.exists():
            cut_rows_after(self.path, int(state.timestamp.batch))

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
            self.latest.update(row)
        self.row = {}


def cut_rows_after(path: Path, batch: int) -> None:
    """Drop the rows of metrics.jsonl past `batch`, and blank or torn lines among them.

    Rows are in batch order, so it reads back from the end only as far as the cut: resuming at
    batch 10,000 costs what resuming at batch 10 does.
    """
    with open(path, "r+b") as f:
        size = end = f.seek(0, os.SEEK_END)
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as text:
                while end > 0:
                    start = text.rfind(b"\n", 0, end - 1) + 1
                    try:
                        if json.loads(text[start:end])["batch"] <= batch:
                            break
                    except (ValueError, KeyError, TypeError):
                        pass  # a blank line, or a row a kill tore in half
                    end = start
        if end < size:
            f.truncate(end)


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


def wandb_run_id(run_name: str) -> str:
    """Return the W&B run id of a run: its run_name (already limited to letters, digits and . _ + -), with a
    hash past W&B's 64 characters, so the same run_name always continues the same W&B run."""
    if len(run_name) <= 64:
        return run_name
    return f"{run_name[:55]}-{hashlib.sha1(run_name.encode()).hexdigest()[:8]}"

