"""Counting the calls that make the host wait for the device: `.item()`, `bool(tensor)`, `.tolist()`, `.cpu()`, ...

On a GPU each one stalls the queue until everything before it has run, and a tiny model's step is mostly queue:
a training batch should make none, and a logging batch a few. These calls sync only on a GPU, but they are the
same calls on the CPU, so they are counted there too (bench/train.py, tests/training/test_syncs.py), through a
`TorchFunctionMode`, which sees every torch function and tensor method called from Python. Each call is
charged to the innermost slm or Composer frame that made it (a torchmetrics or transformers call made for slm's
metrics is slm's), so what slm syncs and what Composer does can be told apart.

Counted: `item`, `tolist`, `cpu`, `numpy`, `bool()` / `int()` / `float()` / `index()` of a tensor, `nonzero`,
`masked_select`, `unique`, `equal`, `allclose`, and indexing with a boolean tensor (its result's shape depends
on the data). Not counted: the step counts torch's optimizers keep on the host, `.to("cpu")` (on the CPU it cannot
be told from moving a batch to the device), and what torch does inside a function handed to it whole
(`F.cross_entropy`, a compiled graph).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from torch.overrides import TorchFunctionMode

SYNCING = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
           "masked_select", "unique", "unique_consecutive", "equal", "allclose"}
INDEXING = {"__getitem__", "__setitem__"}
OWNERS = ("slm", "composer")
HOST_SIDE = "torch.optim"  # torch's optimizers keep their step counts on the host and read them there: no sync


@dataclass(frozen=True)
class Sync:
    """One call that made the host wait for the device, and where it came from."""
    call: str  # the torch function or tensor method
    owner: str  # "slm", "composer", or the package of the innermost frame outside torch
    where: str  # file:line of the innermost frame outside torch


def _boolean_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _caller() -> tuple[str, str]:
    """Return (owner, where) of the call being counted: frames inside torch and this module are skipped."""
    frame, where, owner = sys._getframe(2), None, None
    while frame is not None:
        package = str(frame.f_globals.get("__name__", "")).split(".")[0]
        if package != "torch" and frame.f_code.co_filename != __file__:
            if where is None:
                where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
                owner = package
            if package in OWNERS:
                return package, where
        frame = frame.f_back
    return owner or "torch", where or "?"


class HostSyncs(TorchFunctionMode):
    """`with HostSyncs() as syncs:` records every syncing call in `syncs.calls`, under the current `syncs.key`
    (set it to tell stretches apart: a batch number, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.key: Any = None
        self.calls: dict[Any, list[Sync]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if ((name in SYNCING or (name in INDEXING and _boolean_index(args)))
                and not str(sys._getframe(1).f_globals.get("__name__")).startswith(HOST_SIDE)):
            owner, where = _caller()
            self.calls.setdefault(self.key, []).append(Sync(name, owner, where))
        return func(*args, **(kwargs or {}))

    def count(self, key: Any, owner: str | None = None) -> int:
        return sum(1 for s in self.calls.get(key, []) if owner is None or s.owner == owner)

    def summary(self, keys: list[Any], owner: str) -> Counter:
        """Return (call, where) -> how many times, over `keys`, for one owner."""
        return Counter((s.call, s.where) for key in keys for s in self.calls.get(key, []) if s.owner == owner)


class ByBatch(Callback):
    """A run's callback that files each batch's syncs under its number (from 1), from the moment its data is
    asked for."""

    def __init__(self, syncs: HostSyncs):
        self.syncs = syncs

    def before_dataloader(self, state: State, logger: Logger) -> None:
        self.syncs.key = int(state.timestamp.batch) + 1
