"""Every workaround of a third-party behaviour, in one place, each bound to the version it was written for.

Nothing here changes anything on import. `applied()` is entered by the training entry point
(`slm/train.py`) and undone when it exits; the classes and `check_wandb_login` are used where the
Trainer is made. Each one first checks the installed version of the package whose behaviour it
works around against `WRITTEN_FOR`, and refuses, in one line, to run on another: a newer release
may have fixed the behaviour, or changed the code the workaround leans on. Then read the upstream
code named in its docstring, adapt or drop the workaround, and update `WRITTEN_FOR`.
"""

from __future__ import annotations

import functools
import gc
import netrc
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import tqdm.auto
from composer.core import Engine, State, TimeUnit
from composer.loggers import Logger, ProgressBarLogger, WandBLogger
from composer.utils import dist

from slm.errors import SlmError

# Package -> the versions (or version prefixes) whose behaviour the workarounds below were written against and
# tested on: the pinned stack's first, then the current stack's (stacks/, docs/design.md "The stack").
WRITTEN_FOR = {"mosaicml": ("0.32.1",), "mosaicml-streaming": ("0.13.0",), "wandb": ("0.18", "0.31")}


def require(package: str, workaround: str) -> None:
    """Refuse to apply `workaround` on a version of `package` it was not written for."""
    expected = WRITTEN_FOR[package]
    try:
        installed = metadata.version(package)
    except metadata.PackageNotFoundError:
        installed = "none"
    if not any(installed == version or installed.startswith(version + ".") for version in expected):
        versions = " or ".join(expected)
        raise SlmError(f"slm's workaround for {workaround} (slm/workarounds.py) was written for {package} {versions}, "
                       f"but {installed} is installed: install {package} {expected[0]}, or check the workaround "
                       f"against {installed} and add it to WRITTEN_FOR")


def _signal_file_per_node(original: Any) -> Any:
    def name(rng: Any = None) -> str:
        return f"{original(rng)}-node{dist.get_node_rank()}"

    return name


@contextmanager
def per_node_signal_file() -> Iterator[None]:
    """Composer's `dist.get_node_signal_file_name` (composer/utils/dist.py) draws a name on global rank 0 and
    broadcasts it, so every node gets the same one; autoresume has each node's local rank 0 create and then
    remove that file in the run folder. With the run folder on a shared filesystem (as on clusters) the
    second node's remove fails. Adding the node rank keeps each node's wait its own."""
    require("mosaicml", "the node signal file of Composer's autoresume")
    original = dist.get_node_signal_file_name
    dist.get_node_signal_file_name = _signal_file_per_node(original)
    try:
        yield
    finally:
        dist.get_node_signal_file_name = original


@contextmanager
def quiet_composer_warnings() -> Iterator[None]:
    """Composer warns when a ProgressBarLogger is passed in `loggers` (slm passes ResumableProgressBar, below, on
    purpose) and when a checkpoint lacks that logger's state (it keeps none, on purpose)."""
    require("mosaicml", "Composer's warnings about the progress bar")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Specifying the ProgressBarLogger via `loggers`")
        warnings.filterwarnings("ignore", message="ResumableProgressBar is not in the state_dict")
        yield


@contextmanager
def engine_debug_log_when_asked() -> Iterator[None]:
    """Composer's `Engine._debug_log` (composer/core/engine.py) formats a timestamp string for every callback at
    every event and then logs it only if ENGINE_DEBUG is set: about 130 times a batch, half a millisecond,
    several percent of a tiny model's step. Unless ENGINE_DEBUG is set at the start, it does nothing."""
    require("mosaicml", "the cost of Composer's engine debug log")
    original = Engine._debug_log
    if not os.environ.get("ENGINE_DEBUG"):
        Engine._debug_log = lambda self, event, msg: None
    try:
        yield
    finally:
        Engine._debug_log = original


@contextmanager
def applied() -> Iterator[None]:
    """The process-wide workarounds, for the duration of a training run; Composer is as installed afterwards."""
    with per_node_signal_file(), quiet_composer_warnings(), engine_debug_log_when_asked(), shared_memory_released():
        yield


def _streaming_blocks() -> list[Any]:
    """Every Streaming shared-memory block object alive in this process."""
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
    before = {id(block) for block in _streaming_blocks()}
    try:
        yield
        dist.barrier()
    finally:
        for block in _streaming_blocks():
            if id(block) not in before:
                block.cleanup()


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
        """WandBLogger.init reads the run's address with `wandb.run.get_url()`, which wandb 0.19 removed for the
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
