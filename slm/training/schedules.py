"""Learning-rate schedules: cosine, linear, constant and warmup-stable-decay, and how each continues.

A `Schedule` is a Composer scheduler (Composer calls it with the trainer's state for the multiplier
of `optimizer.lr`, through `compile_composer_scheduler`) and a Composer callback, so the ends it has
committed to ride in every checkpoint. That is what keeps the curve continuous when a run is resumed
or continued with a larger `max_duration` (docs/design.md, "Schedules"):

- cosine, linear: the decay spans `scheduler.horizon`, or the `max_duration` of the run's first
  start; past it the lr holds at `alpha_f * lr`.
- wsd: warmup, stable at `lr`, then a decay over the last `scheduler.decay` of `max_duration`.
  Until the decay starts, a larger `max_duration` moves it to the new end (the stable phase
  extends); once it has started, it keeps its start and end.
- constant: warmup, then `lr`.

Continuing past an end where the lr is 0 would train nothing: `refuse_idle_continuation` says so.
Times are in batches or epochs (converted to batches the way Composer's schedulers do).

Step j trains with the multiplier after j - 1 batches (the first at 0, warming up from 0). Composer
steps its schedulers inside a batch, before it advances the timestamp, so a scheduler reading the
timestamp there gives step j the multiplier after j - 2 batches: the first two steps of a warmup
from 0 would both train at lr 0, leaving the checkpoints of batches 1 and 2 with the initial weights
(`slm verify` finds such identical checkpoints). Inside a batch, `Schedule` counts that batch done.
"""

from __future__ import annotations

import math
from typing import Any

from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from composer.optim.scheduler import _convert_time  # Composer's own ep -> ba conversion for its schedulers

from slm.core.config import SchedulerConfig
from slm.core.errors import SlmError

SHAPES = {"linear": lambda x: 1.0 - x, "cosine": lambda x: (1.0 + math.cos(math.pi * x)) / 2.0,
          "sqrt": lambda x: 1.0 - math.sqrt(x)}


def batches(time: str | Time, state: State, what: str) -> int:
    """Return `time` in batches; tokens and samples are refused (a batch's tokens are not known ahead)."""
    converted = _convert_time(time, state)
    if converted.unit != TimeUnit.BATCH:
        raise SlmError(f"{what} = {time} is not in batches or epochs, which the lr schedules count: give e.g. "
                       "2000ba or 1ep (scheduler.name=constant takes a max_duration in any unit)")
    return int(converted.value)


class Schedule(Callback):
    """`scheduler.*` as a Composer scheduler whose committed ends are checkpointed with the run."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.decay_start: int | None = None  # batches; fixed once known (see the module docstring)
        self.decay_end: int | None = None
        self._in_batch = False  # Composer steps the schedulers inside the batch, its timestamp not yet advanced

    def batch_start(self, state: State, logger: Logger) -> None:
        self._in_batch = True

    def batch_end(self, state: State, logger: Logger) -> None:
        self._in_batch = False

    def _done(self, state: State) -> int:
        """Return the batches trained, the one Composer is finishing counted."""
        return int(state.timestamp.batch) + self._in_batch

    def state_dict(self) -> dict[str, Any]:
        return {"decay_start": self.decay_start, "decay_end": self.decay_end}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay_start, self.decay_end = state.get("decay_start"), state.get("decay_end")

    def _commit(self, state: State) -> None:
        """Fix the decay's ends when the schedule says they are fixed (first call, or the decay's start)."""
        cfg, now = self.cfg, self._done(state)
        if self.decay_end is not None or cfg.name == "constant":
            return
        warmup = batches(cfg.warmup, state, "scheduler.warmup")
        if cfg.name in ("cosine", "linear"):
            self.decay_start = warmup
            self.decay_end = batches(cfg.horizon or state.max_duration, state, "scheduler.horizon or max_duration")
            return
        total = batches(state.max_duration, state, "max_duration")
        try:
            length = round(float(cfg.decay) * total)
        except ValueError:
            length = batches(cfg.decay, state, "scheduler.decay")
        if now >= total - length:  # wsd: the decay starts now, at the end max_duration gives today
            self.decay_start, self.decay_end = max(total - length, warmup), total

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        """Return the lr multiplier of the next step: the one after the batches done."""
        self._commit(state)
        cfg, now = self.cfg, self._done(state)
        warmup = batches(cfg.warmup, state, "scheduler.warmup")
        if now < warmup:
            return now / warmup
        if self.decay_end is None:  # constant, or wsd before its decay
            return 1.0
        x = min(max((now - self.decay_start) / max(self.decay_end - self.decay_start, 1), 0.0), 1.0)
        shape = SHAPES["cosine" if cfg.name == "cosine" else "linear" if cfg.name == "linear" else cfg.decay_shape]
        return cfg.alpha_f + (1.0 - cfg.alpha_f) * shape(x)

    def refuse_idle_continuation(self, state: State, folder: str) -> None:
        """Refuse a run that would train on past the end of its decay at lr 0, which learns nothing: one line on what to
        do."""
        if self.decay_end is None or self.cfg.alpha_f > 0:
            return
        total = batches(state.max_duration, state, "max_duration")
        if total <= self.decay_end:
            return
        done = int(state.timestamp.batch)
        since = "ended" if done >= self.decay_end else "ends"
        branch = ("branch a run off a checkpoint of its stable phase (load.path=CHECKPOINT "
                  "load.weights_only=false, a new run_name), where the decay moves to the new end"
                  if self.cfg.name == "wsd" else "branch a new run off its checkpoint (load.path, a new run_name)")
        raise SlmError(f"the {self.cfg.name} schedule of {folder} {since} at batch {self.decay_end} with lr 0 "
                       f"(scheduler.alpha_f=0), so batches {self.decay_end}-{total} would train nothing: {branch}, "
                       "or give runs meant to be continued scheduler.alpha_f > 0 (or scheduler.name=constant)")
