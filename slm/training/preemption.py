"""Stopping cleanly when the scheduler says time is up (exit 75), or on Ctrl-C (exit 130): a checkpoint at the next
batch end first.

Slurm (`--signal`) and SGE (`-notify`, `s_rt`) warn a job with SIGUSR1 or SIGUSR2 before they stop
it, and send SIGTERM when they cancel, requeue or preempt it. Every training process catches these,
and at the end of the current batch all processes agree, with one all-reduce, to stop there.
Stopping makes that batch the end of training, where Composer's CheckpointSaver always saves; the
end-of-training evaluation is skipped, since the run is not finished. `slm/train.py` then exits with
EXIT_PREEMPTED, which the job scripts turn into a requeue, and the next start resumes from that
checkpoint through autoresume.

SIGINT (Ctrl-C, which a terminal sends to every process of the foreground job) stops the same way,
once training has started: rank 0 says at once which batch it stops at, and the run exits with
EXIT_INTERRUPTED, which no job script requeues (a user asked it to stop); before the first batch
there is nothing to save, and it stops at once. A second SIGINT stops at once: KeyboardInterrupt,
"interrupted", exit 130; the next start resumes from the newest checkpoint. Only a checkpoint being
written is let finish first: an exception inside torch.save leaves a file that ends like a whole one
(the writer closes the zip on its way out) and cannot be loaded. The all-reduce carries which kind
of signal came, so every process exits with the same status; a Ctrl-C anywhere wins over a
scheduler's signal.

Data-loader workers are forked with these handlers; they leave every signal to their training process.
"""

from __future__ import annotations

import os
import signal

import torch
from composer.core import Callback, Event, State, Time
from composer.loggers import Logger
from composer.utils import dist

from slm.cluster.launch import EXIT_INTERRUPTED, EXIT_PREEMPTED, SIGNALS
from slm.core.errors import say

__all__ = ["EXIT_INTERRUPTED", "EXIT_PREEMPTED", "SIGNALS", "StopOnSignal"]

SCHEDULER, CTRL_C = 1, 2  # what a process received, as the all-reduce compares it (the larger wins)
SAVES = frozenset((Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT, Event.ITERATION_CHECKPOINT))  # the saver may write


def _launcher_note() -> str:
    """Return a note on the launcher: Composer's own launcher (`composer -n N`), which gets the Ctrl-C too, sends its
    training processes SIGTERM and kills them 30 s later; `python -m slm.cluster.launch` (which marks its processes
    SLM_LAUNCH=1) waits."""
    if "LOCAL_WORLD_SIZE" in os.environ and os.environ.get("SLM_LAUNCH") != "1":
        return " (if within the 30 s Composer's launcher allows; `python -m slm.cluster.launch` waits)"
    return ""


class StopOnSignal(Callback):
    """Catch SIGNALS and SIGINT from construction on; stop and checkpoint at the first batch end after one arrives.

    Placed just before the CheckpointSaver in the callback list, so the saver sees the stop at the same
    BATCH_CHECKPOINT event.
    """

    def __init__(self) -> None:
        self.received: str | None = None  # SIGINT after a Ctrl-C, else the first signal's name, or another process's
        self.stopped_at: int | None = None
        self.interrupted = False  # the stop is a Ctrl-C's (on any process): exit 130, not 75
        self._kind = 0  # the largest kind this process received
        self._ctrl_c = 0  # SIGINTs received
        self._next_end: int | None = None  # the batch whose end comes next, while training
        self._over = False  # fit has ended
        self._saving = False  # the saver, next in the list, may be writing a checkpoint: no KeyboardInterrupt now
        self._interrupt = False  # a KeyboardInterrupt waits for the checkpoint to be written
        self._pid = os.getpid()
        self._max_duration: Time | None = None
        for sig in (*SIGNALS, signal.SIGINT):
            signal.signal(sig, self._note)

    @property
    def exit_status(self) -> int:
        """The status the run exits with: EXIT_INTERRUPTED after a Ctrl-C, else EXIT_PREEMPTED."""
        return EXIT_INTERRUPTED if self.interrupted else EXIT_PREEMPTED

    def _note(self, signum: int, frame: object) -> None:
        """Record a signal (the handler, training processes only): a scheduler's or a first Ctrl-C stops the run at the
        batch end; another, or one before training, raises KeyboardInterrupt (after any checkpoint being written)."""
        if os.getpid() != self._pid:  # a data-loader worker: its training process answers
            return
        if signum == signal.SIGINT:
            self._ctrl_c += 1
            if self._ctrl_c > 1 or (self._next_end is None and not self._over):  # again, or before training
                if self._saving:
                    self._interrupt = True  # at the next event, once the checkpoint is written
                    return
                raise KeyboardInterrupt
            # Recorded before saying so: Composer's launcher answers the same Ctrl-C with SIGTERM, whose handler can
            # run inside this one; the Ctrl-C is still what stopped the run.
            self._kind, self.received = CTRL_C, "SIGINT"
            say("Ctrl-C: training is over, finishing the uploads; Ctrl-C again to stop at once (the next start "
                      "uploads the rest)" if self._over else
                      f"Ctrl-C: stopping at the end of batch {self._next_end} with a checkpoint{_launcher_note()}; "
                      "Ctrl-C again to stop at once", in_signal_handler=True)
            return
        self._kind = max(self._kind, SCHEDULER)
        self.received = self.received or signal.Signals(signum).name

    def _agreed(self, state: State) -> int:
        """Return the largest kind of signal any process got (they get it at slightly different batches); 0: none."""
        if dist.get_world_size() == 1:
            return self._kind
        flag = state.device.tensor_to_device(torch.tensor([self._kind]))
        dist.all_reduce(flag, reduce_operation="MAX")
        return int(flag.item())

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        self._saving = event in SAVES
        if self._interrupt and not self._saving:
            raise KeyboardInterrupt
        super().run_event(event, state, logger)

    def fit_start(self, state: State, logger: Logger) -> None:
        self._next_end = int(state.timestamp.batch) + 1

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.stopped_at is not None:
            return
        kind = self._agreed(state)
        self._next_end = int(state.timestamp.batch) + 1
        if kind:
            self.interrupted = kind == CTRL_C
            self.received = self.received or f"{'SIGINT' if self.interrupted else 'a signal'} to another process"
            self.stopped_at = int(state.timestamp.batch)
            self._max_duration = state.max_duration
            state.stop_training()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._over, self._next_end = True, None
        # Nothing answers these any more; and a handler of ours is reset to the default (death) while the interpreter
        # shuts down: Composer's launcher, seeing another rank exit 75 first, sends SIGTERM, and this one died of it
        # (status -15, no requeue). Ignored signals stay ignored.
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if self.stopped_at is not None:  # not finished: no end-of-training evaluation
            state.max_duration = self._max_duration
