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

from slm.paths import partial_file

# Composer's name patterns for the CheckpointSaver; every other use of a checkpoint's name derives from these.
FILENAME = "ep{epoch}-ba{batch}-rank{rank}.pt"
LATEST_FILENAME = "latest-rank{rank}.pt"
LATEST = LATEST_FILENAME.format(rank=0)
CHECKPOINT = re.compile(re.escape(FILENAME).replace(r"\{epoch\}", r"(\d+)").replace(r"\{batch\}", r"(\d+)")
                        .replace(r"\{rank\}", "0") + "$")


def checkpoint_name(epoch: int, batch: int) -> str:
    """The rank-0 checkpoint file the CheckpointSaver writes at this epoch and batch."""
    return FILENAME.format(epoch=epoch, batch=batch, rank=0)


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
    for path in folder.glob(FILENAME.format(epoch="*", batch="*", rank=0)) if folder.is_dir() else ():
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


def newest_complete(folder: Path) -> Path | None:
    """The newest rank-0 checkpoint whose file is complete (what a resume starts from), if any."""
    for _, path in sorted(checkpoints(folder).items(), reverse=True):
        if is_complete(path):
            return path
    return None


def repair_latest(folder: Path) -> Path | None:
    """Point `latest-rank0.pt` at the newest complete checkpoint and return it (None: there is none)."""
    path, link = newest_complete(folder), folder / LATEST
    if path is None:
        link.unlink(missing_ok=True)  # dangling or pointing at a torn file
    elif not (link.is_symlink() and os.readlink(link) == path.name):
        with partial_file(link) as tmp:
            tmp.symlink_to(path.name)
    return path


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
