"""Checkpoint schedule, pruning, and a resume point that survives SIGKILL.

Composer saves `ep{E}-ba{B}-rank0.pt` and points `latest-rank0.pt` at it. It writes the file
in place and replaces the symlink by remove-then-create, so a kill at the wrong moment leaves
a torn file or no symlink at all. Before the Trainer starts, `repair_latest` points the
symlink at the newest *whole* checkpoint (`is_complete`), and the run saves with overwrite on,
so files from beyond the resume point are simply rewritten; until then pruning leaves them out.

A file is whole when every tensor storage its pickle refers to is in the zip with its full size.
A readable zip is not enough: torch.save writes the pickle first and the storages after it, and an
exception between two of them (a second Ctrl-C, a full disk) still closes the zip, storages missing;
a kill leaves no central directory at all. Only the pickle is read, with stand-ins for every class,
so the check costs milliseconds whatever the model's size.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
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


def token_batches(per_decade: int, tokens_per_batch: int, decades: int = 15) -> set[int]:
    """The first batch reaching each of 10^(k/per_decade) tokens (k = 1, 2, ... up to 10^decades), when every
    batch holds `tokens_per_batch` tokens; none for 0."""
    targets = {round(10 ** (k / per_decade)) for k in range(1, per_decade * decades + 1)} if per_decade else set()
    return {-(-target // tokens_per_batch) for target in targets}


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


class _AnyObject:
    """Stands in for every class a checkpoint's pickle names: takes any arguments, state and items."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass


class _StorageSizes(pickle.Unpickler):
    """Reads a torch.save pickle for the storages it refers to, {key: bytes}, building nothing else."""

    def __init__(self, file: object) -> None:
        super().__init__(file)
        self.sizes: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> type:
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        return _AnyObject

    def persistent_load(self, pid: tuple) -> _AnyObject:
        _, storage_type, key, _, numel = pid  # ("storage", torch.FloatStorage, "0", "cpu", numel): torch.save's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage is deprecated
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        self.sizes[key] = numel * dtype.itemsize
        return _AnyObject()


def is_complete(path: Path) -> bool:
    """The checkpoint file is whole: its pickle and every storage it refers to, each with its full size."""
    try:
        with zipfile.ZipFile(path) as z:
            records = {info.filename: info.file_size for info in z.infolist()}
            pickles = [name for name in records if name.endswith("/data.pkl")]
            if len(pickles) != 1:
                return False
            root = pickles[0].removesuffix("data.pkl")
            with z.open(pickles[0]) as f:
                reader = _StorageSizes(f)
                reader.load()
    except Exception:  # noqa: BLE001 - anything unreadable is not whole
        return False
    return all(records.get(f"{root}data/{key}") == size for key, size in reader.sizes.items())


def newest_complete(folder: Path) -> Path | None:
    """The newest rank-0 checkpoint whose file is complete (what a resume starts from), if any."""
    for _, path in sorted(checkpoints(folder).items(), reverse=True):
        if is_complete(path):
            return path
    return None


def repair_latest(folder: Path, path: Path | None) -> None:
    """Point `latest-rank0.pt` at `path`, the folder's newest whole checkpoint (None: there is none)."""
    link = folder / LATEST
    if path is None:
        link.unlink(missing_ok=True)  # dangling or pointing at a torn file
    elif not (link.is_symlink() and os.readlink(link) == path.name):
        with partial_file(link) as tmp:
            tmp.symlink_to(path.name)


class KeepNewestPeriodic(Callback):
    """Delete all but the newest `keep` periodic checkpoints; the log-spaced ones (in batches or tokens) always stay.

    Runs after Composer's CheckpointSaver (it is placed after it in the callback list), so `latest` points at
    the newest checkpoint of this run; files beyond it are an earlier start's, torn or abandoned at a kill, and
    are rewritten when the run gets there: they are not counted (a torn one would push out a whole one).
    """

    def __init__(self, folder: Path, keep: int, early: set[int]):
        self.folder, self.keep, self.early = folder, keep, early

    def _prune(self) -> None:
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
