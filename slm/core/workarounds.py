"""Every workaround of a third-party behaviour, and every reliance on a library's private or version-specific
code, is here or named here, each bound to the versions in `WRITTEN_FOR`.

The policy, one for all: what slm applies to a run refuses, in one line (`require`), a version it was not written
for, naming the package, the version installed and the one to install; what only does faster what a library's
public code also does (reading samples) does it the stock way on another version. A newer release may have fixed
the behaviour, or changed the code leaned on: read the upstream code named in the docstring, adapt or drop the
workaround, and add the version to `WRITTEN_FOR`.

Here (nothing changes on import; `applied()` is entered by the trainer, slm/training/trainer.py's `train_command`,
for a run and undone when it exits; the classes and `check_wandb_login` are used where the Trainer is made):
Composer's node signal file, its warnings, its engine's debug log, its event dispatch, its collectives in one
process, its progress bar after a resume, its checkpoint unpickling (through slm/core/trust.py's gate), W&B's
checkpoint downloads and login check, Streaming's reading of a shard folder and its index.json (links out of the
folder, shard names, counts against bytes), its shared memory (its prefix registration, its blocks held until exit)
and its threads after a partial read. Elsewhere:
- slm/data/mapped_shards.py: Streaming's private sample partition and MDS reader fields (falls back: the stock read);
- slm/analysis/batches.py: Streaming's partition calls, to name each step's samples (refuses);
- tests/helpers/pytest_capture.py: pytest's capture manager, to train in the test process (pytest 9.2).
"""

from __future__ import annotations

import functools
import gc
import netrc
import os
import signal
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import tqdm.auto
from composer.core import Callback, Engine, Event, State, TimeUnit
from composer.core.event import _AFTER_EVENTS, _BEFORE_EVENTS
from composer.loggers import Logger, LoggerDestination, ProgressBarLogger, WandBLogger
from composer.trainer import Trainer
from composer.utils import dist
from streaming.base.format.mds.reader import MDSReader

from slm.core.errors import Refused, SlmError
from slm.core.foreign import checked_folder, plain_name
from slm.core.shard_index import checked_shard
from slm.core.shared_memory import node_lock
from slm.core.trust import unpickle_checkpoint

# Package -> the versions (or version prefixes) whose behaviour the workarounds below were written against and
# tested on: the pinned stack's first, then the current stack's (stacks/, docs/design.md "The stack").
WRITTEN_FOR = {"mosaicml": ("0.32.1",), "mosaicml-streaming": ("0.13.0",), "wandb": ("0.18", "0.31")}


def _installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def written_for(package: str) -> bool:
    """Return whether the installed `package` is a version slm's reliance on its internals was written for."""
    installed = _installed(package)
    return any(installed == version or installed.startswith(version + ".") for version in WRITTEN_FOR[package])


def require(package: str, workaround: str) -> None:
    """Refuse to apply `workaround` on a version of `package` it was not written for."""
    expected, installed = WRITTEN_FOR[package], _installed(package)
    if not written_for(package):
        versions = " or ".join(expected)
        raise SlmError(f"slm's workaround for {workaround} (slm/core/workarounds.py) was written for {package} "
                       f"{versions}, but {installed} is installed: install {package} {expected[0]}, or check the "
                       f"workaround against {installed} and add it to WRITTEN_FOR")


@contextmanager
def _replaced(*replacements: tuple[Any, str, Any]) -> Iterator[None]:
    """Set each (owner, name, value): `owner.name = value` for the duration, then the original again."""
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in replacements]
    for owner, name, value in replacements:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)


def _signal_file_per_node(original: Any) -> Any:
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
    with _replaced((dist, "get_node_signal_file_name", _signal_file_per_node(dist.get_node_signal_file_name))):
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
    with _replaced((Engine, "_debug_log", lambda self, event, msg: None)):
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

    with _replaced((Engine, "_run_loggers", run_loggers), (Engine, "_run_nonlogger_callbacks", run_nonlogger_callbacks),
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

    with _replaced((dist, "all_reduce", all_reduce_in_one), (dist, "broadcast", broadcast_in_one),
                   (Trainer, "_accumulate_time_across_ranks", accumulate_in_one)):
        yield


def _checked_load(checkpoint_filepath: Path | str, map_location: str) -> Any:
    from composer.utils import checkpoint

    return unpickle_checkpoint(checkpoint._ensure_valid_checkpoint(checkpoint_filepath), map_location)


def _named_load(load_checkpoint: Any) -> Any:
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

    with _replaced((checkpoint, "_torch_load_with_validation", _checked_load),
                   (checkpoint, "load_checkpoint", _named_load(checkpoint.load_checkpoint))):
        yield


def _index_checked(get_shards: Any) -> Any:
    @functools.wraps(get_shards)
    def checked(self: Any, world: Any, allow_unsafe_types: bool) -> Any:
        folder = Path(self.local, self.split or "")
        checked_folder(folder, "shard folder")  # before anything is downloaded into it
        shards = get_shards(self, world, allow_unsafe_types)
        where = f"shard index {folder / 'index.json'}"
        for i, shard in enumerate(shards):
            if isinstance(shard, MDSReader):
                zipped = shard.zip_data
                checked_shard({"samples": shard.samples, "column_sizes": shard.column_sizes,
                               "raw_data": {"basename": shard.raw_data.basename, "bytes": shard.raw_data.bytes},
                               "zip_data": {"basename": zipped.basename, "bytes": zipped.bytes} if zipped else None},
                              folder, f"{where}, shard {i}")
            for pair in shard.file_pairs:
                for info in filter(None, pair):
                    plain_name(info.basename, where, below=True)
        return shards

    return checked


@contextmanager
def shard_index_checked() -> Iterator[None]:
    """Check a shard folder and what its index.json says before Streaming acts on it. Streaming joins the shard names of
    an index.json (`raw_data`/`zip_data` basenames) to the local folder unchecked (`../x` downloads a remote's file
    outside the folder, decompresses into it or deletes it), writes into the folder through any link it finds there
    (the temporary names it downloads and decompresses into included), and allocates for as many samples as the index
    says. Its `Stream.get_shards` (streaming/base/stream.py) fetches and reads the index before any shard is touched;
    here the folder is checked first (no link leading out: slm/core/foreign.py), and every shard the index names after
    (its names, and its counts against its bytes: slm/core/shard_index.py), on every process, for every stream."""
    require("mosaicml-streaming", "Streaming's shard names read from index.json")
    from streaming.base.stream import Stream

    with _replaced((Stream, "get_shards", _index_checked(Stream.get_shards))):
        yield


@contextmanager
def resource_tracker_deaf_to_job_signals() -> Iterator[None]:
    """Start the resource tracker deaf to SGE's job signals. Python's multiprocessing resource tracker
    (multiprocessing/resource_tracker.py), which Streaming's shared memory registers with, is a process of its own in
    the run's process group; it ignores SIGINT and SIGTERM but not SIGUSR1/SIGUSR2, which SGE sends to every process of
    a job at its soft limit and before a kill (-notify). It died of them ("process died unexpectedly, relaunching", then
    a KeyError traceback for each shared-memory block at exit). Started here with those signals ignored, which the
    process it execs inherits."""
    from multiprocessing import resource_tracker

    if threading.current_thread() is not threading.main_thread():  # signals are the main thread's to set
        yield
        return
    before = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        resource_tracker.ensure_running()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    yield


@contextmanager
def applied() -> Iterator[None]:
    """Apply the process-wide workarounds, for the duration of a training run; Composer is as installed afterwards."""
    with (per_node_signal_file(), quiet_composer_warnings(), engine_debug_log_when_asked(), quick_event_dispatch(),
          single_process_collectives(), checkpoints_through_the_gate(), shard_index_checked(),
          resource_tracker_deaf_to_job_signals(), prefix_registered_under_node_lock(), shared_memory_released()):
        yield


def _register_prefix(streams_local: list[str], streams_remote: list[str | None], world: Any,
                     retry: int = 100) -> tuple[int, Any]:
    """Stand in for Streaming's `get_shm_prefix`, with the prefix chosen and registered by the node's leader alone,
    under the node's lock, and handed to the other processes of the run (the docstring of the context manager below)."""
    import torch.distributed
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared import SharedMemory
    from streaming.base.shared import prefix as streaming

    streaming._check_self(streams_local)
    chosen: int | str | None = None  # the prefix, or the error the leader met
    block = None
    if world.is_local_leader:
        with node_lock():
            for _ in range(retry):  # a process without the lock (Streaming used directly) may take a prefix first
                try:
                    chosen = max(streaming._check_and_find_retrying(streams_local, streams_remote, name, retry)
                                 for name in SHM_TO_CLEAN)
                    data = streaming._pack_locals(streams_local, chosen)
                    block = SharedMemory(streaming._get_path(chosen, LOCALS), True, len(data))
                    block.buf[:len(data)] = data
                    break
                except FileExistsError:
                    continue
                except ValueError as e:  # a local folder another live dataset with a remote uses
                    chosen = str(e)
                    break
            else:
                chosen = f"no free Streaming shared-memory prefix after {retry} tries: other processes took each"
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (world.node, chosen))
        chosen = next(c for node, c in gathered if node == world.node and c is not None)
    if isinstance(chosen, str):
        raise ValueError(chosen)
    if block is None:
        block = SharedMemory(streaming._get_path(chosen, LOCALS), False)
        if streaming._unpack_locals(bytes(block.buf)) != (streams_local, chosen):
            raise RuntimeError(f"Streaming's shared memory prefix {chosen} does not hold this run's local folders")
    return chosen, block


@contextmanager
def prefix_registered_under_node_lock() -> Iterator[None]:
    """Keep runs starting at the same moment on one node from taking the same Streaming prefix or losing its blocks.

    Streaming (streaming/base/shared/prefix.py, `get_shm_prefix`) has every process of a run scan /dev/shm for
    the first free prefix on its own, then the node's leader creates the prefix's `locals` block after a barrier,
    and the others attach to it after another. Another run registering in between makes the leader's create fail
    (FileExistsError), or the processes of one run disagree on their prefix ("shared memory registered does not
    match"); slm's clean-up of stale blocks (slm/core/shared_memory.py) could remove a block between its creation
    and the other processes' attach. Here the leader scans and creates under the node's lock (which the clean-up
    holds too) and gives its prefix to the other processes, which attach to it. `streaming.base.dataset` imported
    the function by name; that name is replaced."""
    require("mosaicml-streaming", "Streaming's shared-memory prefix registration")
    import streaming.base.dataset

    with _replaced((streaming.base.dataset, "get_shm_prefix", _register_prefix)):
        yield


def _streaming_blocks() -> list[Any]:
    """Find every Streaming shared-memory block object alive in this process."""
    from streaming.base.shared import SharedMemory

    return [o for o in gc.get_objects() if type(o) is SharedMemory]  # type(): isinstance wakes lazy modules


@contextmanager
def shared_memory_released() -> Iterator[None]:
    """Let go of the Streaming shared memory a run opened, once it is over (finished or failed), so that runs one
    after another in one process (a notebook, tests) do not run out of file descriptors.

    Streaming (streaming/base/shared/memory.py) closes a block only at exit, through an atexit hook per block, and
    a new dataset looking for a free prefix (shared/prefix.py, `_check_and_find`) attaches to the blocks of every
    earlier one and never closes them: each run held some forty more descriptors, and more with every dataset
    left open. The hooks are the only other reference to those objects, so they are found through the garbage
    collector: each one made during the run is closed, and its block removed where this process made it. After a
    run that ended well every process waits for the others first (a block's name is shared by the node's
    processes; a failed run's processes are stopping anyway).
    """
    require("mosaicml-streaming", "Streaming's shared memory held until exit")
    import torch.distributed

    before = {id(block) for block in _streaming_blocks()}
    try:
        yield
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
    finally:
        for block in _streaming_blocks():
            if id(block) not in before:
                block.cleanup()


def stop_reading(dataset: Any) -> None:
    """Stop the background threads of a StreamingDataset iterated only in part, before its shared memory goes.
    Streaming's `__iter__` (streaming/base/dataset.py) leaves its prepare and ready threads running when the caller
    stops early (`slm eval --max-batches`); once `shared_memory_released` has let go of the blocks, they read a shard
    state that is gone and print a traceback ("Invalid shard state") from their thread. Its own `_iterator.exit()` and
    thread pool are used, where this Streaming has them."""
    iterator, executor = getattr(dataset, "_iterator", None), getattr(dataset, "_executor", None)
    if iterator is not None:
        iterator.exit()
    if executor is not None:
        executor.shutdown(wait=True)


@contextmanager
def streaming_datasets() -> Iterator[None]:
    """Provide what a command reading shards through Streaming outside a training run needs (`slm eval`, `slm logprobs`,
    a notebook calling them): its datasets' prefixes registered under the node's lock, and their shared memory let
    go of when it is done, and their shard names checked."""
    with shard_index_checked(), prefix_registered_under_node_lock(), shared_memory_released():
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


def check_wandb_login(project: str) -> None:
    """Refuse W&B logging that would stop at start on a missing login.

    wandb.init (wandb/sdk/wandb_login.py), called inside Composer's Trainer(), raises a long
    traceback when there is no API key; this looks where wandb looks (WANDB_MODE, WANDB_API_KEY,
    its settings file, the netrc entry for its host) before anything starts.
    """
    require("wandb", "the W&B login check")
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    settings = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb")) / "settings"
    if settings.is_file() and any(line.replace(" ", "") in ("mode=offline", "mode=disabled")
                                  for line in settings.read_text().splitlines()):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise SlmError(f"logging.wandb.project is {project} but there is no W&B login for {host}: run `wandb login`, "
                   "set WANDB_API_KEY, or set WANDB_MODE=offline to log locally")
