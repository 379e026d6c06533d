"""Checkpoint schedule, pruning, and a resume point that survives SIGKILL.

Composer saves `ep{E}-ba{B}-rank0.pt` and points `latest-rank0.pt` at it. It writes the file
in place and replaces the symlink by remove-then-create, so a kill at the wrong moment leaves
a truncated file or no symlink at all. Before the Trainer starts, `repair_latest` points the
symlink at the newest *complete* checkpoint (torch.save writes a zip whose central directory
comes last, so a truncated file is detectable without loading it), and the run saves with
overwrite on, so files from beyond the resume point are simply rewritten.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

CHECKPOINT = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")
LATEST = "latest-rank0.pt"


def early_batches(up_to: int) -> set[int]:
    """1, 2, 4, ... up to `up_to` (none for 0)."""
    return {2**k for k in range(up_to.bit_length()) if 2**k <= up_to} if up_to > 0 else set()


def save_schedule(interval: str, early: set[int]) -> Callable[[State, Event], bool]:
    """Composer's periodic schedule (which also saves at the end of training) plus the early batches."""
    periodic = create_interval_scheduler(interval)

    def should_save(state: State, event: Event) -> bool:
        due = periodic(state, event)  # always called: it keeps its own state
        return due or (event == Event.BATCH_CHECKPOINT and int(state.timestamp.batch) in early)

    return should_save


def checkpoints(folder: Path) -> dict[int, Path]:
    """Rank-0 checkpoint files by batch."""
    found = {}
    for path in folder.glob("ep*-ba*-rank0.pt") if folder.is_dir() else ():
        match = CHECKPOINT.match(path.name)
        if match:
            found[int(match.group(2))] = path
    return found


def is_complete(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def repair_latest(folder: Path) -> int | None:
    """Point `latest-rank0.pt` at the newest complete checkpoint; returns its batch (None: none)."""
    for batch, path in sorted(checkpoints(folder).items(), reverse=True):
        if is_complete(path):
            link = folder / LATEST
            if not (link.is_symlink() and os.readlink(link) == path.name):
                tmp = folder / f".{LATEST}.tmp"
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(path.name)
                tmp.replace(link)  # atomic
            return batch
    (folder / LATEST).unlink(missing_ok=True)  # dangling or pointing at a torn file
    return None


class KeepNewestPeriodic(Callback):
    """Delete all but the newest `keep` periodic checkpoints; early (log-spaced) ones always stay.

    Runs after Composer's CheckpointSaver (it is placed after it in the callback list).
    """

    def __init__(self, folder: Path, keep: int, early: set[int]):
        self.folder, self.keep, self.early = folder, keep, early

    def _prune(self) -> None:
        if self.keep < 0 or dist.get_global_rank() != 0:
            return
        latest = (self.folder / LATEST).resolve()
        found = checkpoints(self.folder)
        periodic = sorted(b for b in found if b not in self.early)
        for batch in periodic[: max(0, len(periodic) - self.keep)]:
            if found[batch].resolve() != latest:
                found[batch].unlink(missing_ok=True)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._prune()

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._prune()
