"""Stopping cleanly when the scheduler says time is up: a checkpoint at the next batch, then exit 75.

Slurm (`--signal`) and SGE (`-notify`, `s_rt`) warn a job with SIGUSR1 or SIGUSR2 before they stop
it, and send SIGTERM when they cancel, requeue or preempt it. Every training process catches these
(so do its data-loader workers, which inherit the handler), and at the end of the current batch all
processes agree, with one all-reduce, to stop there. Stopping makes that batch the end of training,
where Composer's CheckpointSaver always saves; the end-of-training evaluation is skipped, since the
run is not finished. `slm/train.py` then exits with EXIT_PREEMPTED, which the job scripts turn into
a requeue, and the next start resumes from that checkpoint through autoresume.
"""

from __future__ import annotations

import signal

import torch
from composer.core import Callback, State, Time
from composer.loggers import Logger
from composer.utils import dist

from slm.launch import EXIT_PREEMPTED, SIGNALS

__all__ = ["EXIT_PREEMPTED", "StopOnSignal"]


class StopOnSignal(Callback):
    """Catch SIGNALS from construction on; stop and checkpoint at the first batch end after one arrives.

    Placed just before the CheckpointSaver in the callback list, so the saver sees the stop at the same
    BATCH_CHECKPOINT event.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self.stopped_at: int | None = None
        self._max_duration: Time | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum: int, frame: object) -> None:
        self.received = self.received or signal.Signals(signum).name

    def _agreed(self, state: State) -> bool:
        """Whether any process got a signal (they get it at slightly different batches)."""
        if dist.get_world_size() == 1:
            return self.received is not None
        flag = state.device.tensor_to_device(torch.tensor([int(self.received is not None)]))
        dist.all_reduce(flag, reduce_operation="MAX")
        return bool(flag.item())

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.stopped_at is None and self._agreed(state):
            self.received = self.received or "a signal to another process"
            self.stopped_at = int(state.timestamp.batch)
            self._max_duration = state.max_duration
            state.stop_training()

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.stopped_at is not None:  # not finished: no end-of-training evaluation
            state.max_duration = self._max_duration
