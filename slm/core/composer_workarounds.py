"""slm's workarounds of Composer's behaviour (the policy and the versions: slm/core/workarounds.py).

Patched for a run by `applied()`: the node signal file, warnings, the engine's debug log, event dispatch, collectives
in one process, checkpoint unpickling. Given to the Trainer: `ResumableProgressBar` and `WandB`, Composer's loggers
with their behaviour after a resume and their checkpoint downloads mended.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tqdm.auto
from composer.core import Callback, Engine, Event, State, TimeUnit
from composer.core.event import _AFTER_EVENTS, _BEFORE_EVENTS
from composer.loggers import Logger, LoggerDestination, ProgressBarLogger, WandBLogger
from composer.trainer import Trainer
from composer.utils import dist

from slm.core.errors import Refused
from slm.core.trust import unpickle_checkpoint
from slm.core.workarounds import replaced, require


def _signal_file_per_node(original: Any) -> Any:
    """Return `original` (Composer's signal file namer) with `-node` and this node's rank added to the name it draws."""
    def name(rng: Any = None) -> str:
        return f"{original(rng)}-node{dist.get_node_rank()}"

    return name

@contextmanager
def per_node_signal_file() -> Iterator[None]:
    """Add the node rank to the name of autoresume's node signal file. Composer's `dist.get_node_signal_file_name`
    (composer/utils/dist.py) draws a name on global rank 0 and broadcasts it, so every node gets the same one;
    autoresume has each node's local rank 0 create and then remove that file in the run folder. With the run folder on a
    shared filesystem (as on clusters) the second node's remove fails. Adding the node rank keeps each node's wait its
    own."""
    require("mosaicml", "the node signal file of Composer's autoresume")
    with replaced((dist, "get_node_signal_file_name", _signal_file_per_node(dist.get_node_signal_file_name))):
        yield

@contextmanager
def quiet_composer_warnings() -> Iterator[None]:
    """Silence Composer's warnings when a ProgressBarLogger is passed in `loggers` (slm passes ResumableProgressBar,
    below, on purpose) and when a checkpoint lacks that logger's state (it keeps none, on purpose)."""
    require("mosaicml", "Composer's warnings about the progress bar")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Specifying the ProgressBarLogger via `loggers`")
        warnings.filterwarnings("ignore", message="ResumableProgressBar is not in the state_dict")
        yield

@contextmanager
def engine_debug_log_when_asked() -> Iterator[None]:
    """Skip Composer's engine debug log unless ENGINE_DEBUG is set. Composer's `Engine._debug_log`
    (composer/core/engine.py) formats a timestamp string for every callback at every event and then logs it only if
    ENGINE_DEBUG is set: about 130 times a batch, half a millisecond, several percent of a tiny model's step. Unless
    ENGINE_DEBUG is set at the start, it does nothing."""
    require("mosaicml", "the cost of Composer's engine debug log")
    if os.environ.get("ENGINE_DEBUG"):
        yield
        return
    with replaced((Engine, "_debug_log", lambda self, event, msg: None)):
        yield

@functools.cache
def _answers(cls: type, event_name: str) -> bool:
    """Return whether a callback class does anything at an event: its method for it, or its run_event, is its own."""
    return (cls.run_event is not Callback.run_event
            or getattr(cls, event_name, None) is not getattr(Callback, event_name, None))

def _dispatch(engine: Engine, event: Event, loggers: bool) -> None:
    """Run the loggers' (or the other callbacks') answers to `event`, in state.callbacks' order."""
    callbacks = engine.state.callbacks
    key = (event, loggers, tuple(map(id, callbacks)))
    cache = engine.__dict__.setdefault("_slm_answering", {})
    if key not in cache:  # a new event, or state.callbacks changed (same list of the same objects: same answer)
        if len(cache) > 1024:
            cache.clear()
        cache[key] = [cb for cb in callbacks
                      if isinstance(cb, LoggerDestination) == loggers and _answers(type(cb), event.value)]
    for callback in cache[key]:
        callback.run_event(event, engine.state, engine.logger)

@contextmanager
def quick_event_dispatch() -> Iterator[None]:
    """Speed up Composer's event dispatch. Composer's Engine (composer/core/engine.py) spends ~37 us on each of a
    batch's 13 events before anything happens: `Event.is_before_event` / `is_after_event` look the event up in tuples of
    15 through StringEnum's Python `__eq__`, `_run_loggers` and `_run_nonlogger_callbacks` rebuild their lists with
    isinstance, every callback is called (most with Callback's empty method), and `_run_algorithms` orders and traces an
    empty list. Here the same callbacks run in the same order, only those whose class answers the event (its method or
    its run_event overridden), their lists kept while state.callbacks holds the same objects; membership is a set
    lookup; with no matching algorithm there is no pass and no trace. With a profiler (whose markers need every
    call) or ENGINE_DEBUG set, Composer's own dispatch runs."""
    require("mosaicml", "the cost of Composer's event dispatch")
    if os.environ.get("ENGINE_DEBUG"):
        yield
        return
    originals = {name: getattr(Engine, name) for name in ("_run_loggers", "_run_nonlogger_callbacks",
                                                          "_run_algorithms")}
    before, after = frozenset(_BEFORE_EVENTS), frozenset(_AFTER_EVENTS)

    def run_loggers(self: Engine, event: Event | str) -> None:
        if self.state.profiler is not None:
            return originals["_run_loggers"](self, event)
        _dispatch(self, Event(event), loggers=True)

    def run_nonlogger_callbacks(self: Engine, event: Event | str) -> None:
        if self.state.profiler is not None:
            return originals["_run_nonlogger_callbacks"](self, event)
        _dispatch(self, Event(event), loggers=False)

    def run_algorithms(self: Engine, event: Event) -> Any:
        if self.state.profiler is None and not any(a.match(event, self.state) for a in self.state.algorithms):
            return OrderedDict()  # the Traces of no algorithm
        return originals["_run_algorithms"](self, event)

    with replaced((Engine, "_run_loggers", run_loggers), (Engine, "_run_nonlogger_callbacks", run_nonlogger_callbacks),
                   (Engine, "_run_algorithms", run_algorithms),
                   (Event, "is_before_event", property(lambda event: event in before)),
                   (Event, "is_after_event", property(lambda event: event in after))):
        yield

@contextmanager
def single_process_collectives() -> Iterator[None]:
    """Skip Composer's collectives at world size 1. In one process, Composer still runs five collectives a batch through
    its `dist` (composer/utils/dist.py: the data loader's end, the batch size, the loss, SpeedMonitor's FLOPs, the time)
    on a one-process gloo group, and `Trainer._accumulate_time_across_ranks` builds two tensors a batch and reads them
    back with three `.item()` calls (host syncs on a GPU). At world size 1 an all-reduce or broadcast leaves its tensor
    as it is, so here it returns at once, and the batch's samples, tokens and time are taken as they are."""
    require("mosaicml", "Composer's collectives in one process")
    all_reduce, broadcast = dist.all_reduce, dist.broadcast
    accumulate = Trainer._accumulate_time_across_ranks

    def all_reduce_in_one(tensor: Any, reduce_operation: str = "SUM", group: Any = None) -> None:
        if dist.get_world_size() > 1:
            all_reduce(tensor, reduce_operation, group)

    def broadcast_in_one(tensor: Any, src: int, group: Any = None) -> None:
        if dist.get_world_size() > 1:
            broadcast(tensor, src, group)

    def accumulate_in_one(self: Trainer, num_samples: Any, num_tokens: int, batch_time: Any) -> Any:
        if dist.get_world_size() == 1 and isinstance(num_samples, int):
            return num_samples, int(num_tokens), batch_time
        return accumulate(self, num_samples, num_tokens, batch_time)

    with replaced((dist, "all_reduce", all_reduce_in_one), (dist, "broadcast", broadcast_in_one),
                   (Trainer, "_accumulate_time_across_ranks", accumulate_in_one)):
        yield

def _checked_load(checkpoint_filepath: Path | str, map_location: str) -> Any:
    """Run Composer's validation hook on the checkpoint, then unpickle it through slm's gate (`unpickle_checkpoint`)."""
    from composer.utils import checkpoint

    return unpickle_checkpoint(checkpoint._ensure_valid_checkpoint(checkpoint_filepath), map_location)

def _named_load(load_checkpoint: Any) -> Any:
    """Wrap Composer's `load_checkpoint` so a refusal names the checkpoint the run was given, not a temporary copy."""
    @functools.wraps(load_checkpoint)
    def load(path: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return load_checkpoint(path, *args, **kwargs)
        except Refused as e:  # Composer unpickles a temporary copy: name the checkpoint the run was given
            given = os.path.realpath(path) if os.path.islink(path) else path  # `latest`: the file it points at
            raise Refused(str(e).replace(e.file, given) if e.file else str(e), given) from None

    return load

@contextmanager
def checkpoints_through_the_gate() -> Iterator[None]:
    """Send Composer's checkpoint loads through slm's gate. Composer unpickles every checkpoint it loads (autoresume
    from the run folder or the Hub, a warm start's `load_path`) with `torch.load(weights_only=False)`, hard-coded in
    `_torch_load_with_validation` (composer/utils/checkpoint.py): a checkpoint naming any global runs it. That function
    is replaced by slm's gate, `slm.core.trust.unpickle_checkpoint` (weights_only, the globals of slm checkpoints
    alone); Composer's validation hook (`CHECKPOINT_VALIDATION_FUNCTION`) is still called first. Its `load_checkpoint`,
    which unpickles a temporary copy, is wrapped so that a refusal names the checkpoint the run was given."""
    require("mosaicml", "Composer's checkpoint unpickling")
    from composer.utils import checkpoint

    with replaced((checkpoint, "_torch_load_with_validation", _checked_load),
                   (checkpoint, "load_checkpoint", _named_load(checkpoint.load_checkpoint))):
        yield


@contextmanager
def applied() -> Iterator[None]:
    """Apply the process-wide Composer workarounds, for the duration of a training run; Composer is as installed
    afterwards."""
    with (per_node_signal_file(), quiet_composer_warnings(), engine_debug_log_when_asked(), quick_event_dispatch(),
          single_process_collectives(), checkpoints_through_the_gate()):
        yield


class ResumableProgressBar(ProgressBarLogger):
    """Composer's progress bar, right after autoresume.

    Composer (loggers/progress_bar_logger.py) builds the train bar at EPOCH_START, which a run
    resumed mid-epoch never sees (it showed no train bar at all), and counts a new bar from zero.
    This one is built at fit start at the resumed position out of the total, with its rate
    measured from there. The bar's state is not checkpointed: it is rebuilt from the timestamp,
    whatever the total is now.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        require("mosaicml", "Composer's progress bar after a resume")
        super().__init__(*args, **kwargs)

    def fit_start(self, state: State, logger: Logger) -> None:
        super().fit_start(state, logger)
        if self.show_pbar and self.train_pbar is None:
            self.train_pbar = self._build_pbar(state, is_train=True)

    def _build_pbar(self, state: State, is_train: bool):
        """Build the bar as Composer does, a train bar counting from the position reached (in the epoch, or in
        max_duration's unit), not from zero."""
        if not is_train:
            return super()._build_pbar(state, is_train)
        by_epoch = state.max_duration is None or state.max_duration.unit == TimeUnit.EPOCH
        done = int(state.timestamp.batch_in_epoch if by_epoch else state.timestamp.get(state.max_duration.unit))
        # Composer's _ProgressBar calls tqdm.auto.tqdm without `initial`; give it one for this call, so not
        # even the first frame counts from zero.
        plain = tqdm.auto.tqdm
        tqdm.auto.tqdm = functools.partial(plain, initial=done)
        try:
            return super()._build_pbar(state, is_train)
        finally:
            tqdm.auto.tqdm = plain

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

class WandB(WandBLogger):
    """Composer's W&B logger, minus checkpoint downloads.

    Composer's autoresume (trainer.py) asks every logger that can download files for the newest
    checkpoint, and WandBLogger.download_file asks the W&B API (a network call) for an artifact.
    slm keeps checkpoints locally and on the Hub, never as W&B artifacts.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        require("mosaicml", "Composer's W&B checkpoint download")
        super().__init__(*args, **kwargs)

    def download_file(self, remote_file_name: str, destination: str, overwrite: bool = False,
                      progress_bar: bool = True) -> None:
        raise NotImplementedError

    def init(self, state: State, logger: Logger) -> None:
        """Run WandBLogger.init; it reads the run's address with `wandb.run.get_url()`, which wandb 0.19 removed for the
        `url` property: lend the run class that method for the call, where it lacks it."""
        from wandb.sdk.wandb_run import Run

        if hasattr(Run, "get_url"):
            return super().init(state, logger)
        Run.get_url = lambda run: run.url
        try:
            super().init(state, logger)
        finally:
            del Run.get_url
