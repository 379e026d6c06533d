"""When a run saves checkpoints and which it keeps: Composer's periodic schedule plus log-spaced early batches,
and pruning of the periodic ones (slm.core.run_folder reads what they leave)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

from slm.core.run_folder import CHECKPOINT, LATEST, checkpoints


def early_batches(up_to: int) -> set[int]:
    """Return 1, 2, 4, ... up to `up_to` (none for 0)."""
    return {2**k for k in range(up_to.bit_length()) if 2**k <= up_to} if up_to > 0 else set()


def token_batches(per_decade: int, tokens_per_batch: int, decades: int = 15) -> set[int]:
    """Return the first batch reaching each of 10^(k/per_decade) tokens (k = 1, 2, ... up to 10^decades), when every
    batch holds `tokens_per_batch` tokens; none for 0."""
    targets = {round(10 ** (k / per_decade)) for k in range(1, per_decade * decades + 1)} if per_decade else set()
    return {-(-target // tokens_per_batch) for target in targets}


def save_schedule(interval: str, early: set[int]) -> Callable[[State, Event], bool]:
    """Return Composer's periodic schedule (which also saves at the end of training) plus the early batches."""
    periodic = create_interval_scheduler(interval)

    def should_save(state: State, event: Event) -> bool:
        due = periodic(state, event)  # always called: it keeps its own state
        return due or (event == Event.BATCH_CHECKPOINT and int(state.timestamp.batch) in early)

    return should_save



class KeepNewestPeriodic(Callback):
    """Delete all but the newest `keep` periodic checkpoints; the log-spaced ones (in batches or tokens) always stay.

    Runs after Composer's CheckpointSaver (it is placed after it in the callback list), so `latest` points at
    the newest checkpoint of this run; files beyond it are an earlier start's, torn or abandoned at a kill, and
    are rewritten when the run gets there: they are not counted (a torn one would push out a whole one).
    """

    def __init__(self, folder: Path, keep: int, early: set[int]):
        self.folder, self.keep, self.early = folder, keep, early

    def _prune(self) -> None:
        """On rank 0, delete all but the newest `keep` periodic checkpoints, of those up to `latest` (-1: keep all)."""
        if self.keep < 0 or dist.get_global_rank() != 0:
            return
        latest = self.folder / LATEST
        newest = CHECKPOINT.match(os.readlink(latest)) if latest.is_symlink() else None
        if newest is None:
            return
        found = checkpoints(self.folder)
        periodic = sorted(b for b in found if b not in self.early and b <= int(newest.group(2)))
        for batch in periodic[: max(0, len(periodic) - self.keep)]:
            found[batch].unlink(missing_ok=True)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._prune()

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._prune()
