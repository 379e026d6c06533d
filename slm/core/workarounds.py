"""The versions slm's workarounds of third-party behaviour were written for, the check each one makes, and where
every workaround and every other reliance on a library's private or version-specific code is.

The policy, one for all: what slm applies to a run refuses, in one line (`require`), a version it was not written
for, naming the package, the version installed and the one to install; what only does faster what a library's
public code also does (reading samples) does it the stock way on another version. A newer release may have fixed
the behaviour, or changed the code leaned on: read the upstream code named in the docstring, adapt or drop the
workaround, and add the version to `WRITTEN_FOR`. This module imports none of those libraries.

Where they are (nothing changes on import; each module's `applied()` is entered by the trainer,
slm/training/trainer.py's `train_command`, for a run and undone when it exits):
- slm/core/composer_workarounds.py: Composer's node signal file, its warnings, its engine's debug log, its event
  dispatch, its collectives in one process, its checkpoint unpickling (through slm/core/trust.py's gate), its
  progress bar after a resume and its W&B logger's checkpoint downloads (the logger classes the Trainer is given);
- slm/core/streaming_workarounds.py: Streaming's reading of a shard folder and its index.json (links out of the
  folder, shard names, counts against bytes), its shared memory (its prefix registration, its blocks held until
  exit) and its threads after a partial read;
- slm/core/wandb_workarounds.py: the W&B login check before the Trainer is made;
- slm/data/mapped_shards.py: Streaming's private sample partition and MDS reader fields (falls back: the stock read);
- slm/analysis/batches.py: Streaming's partition calls, to name each step's samples (refuses);
- tests/helpers/pytest_capture.py: pytest's capture manager, to train in the test process (pytest 9.2).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

from slm.core.errors import SlmError

# Package -> the versions (or version prefixes) whose behaviour the workarounds were written against and tested on:
# the pinned stack's first, then the current stack's (stacks/, docs/design.md "The stack").
WRITTEN_FOR = {"mosaicml": ("0.32.1",), "mosaicml-streaming": ("0.13.0",), "wandb": ("0.18", "0.31")}


def _installed(package: str) -> str:
    """Return the installed version of `package`, or "none" where it is not installed."""
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
def replaced(*replacements: tuple[Any, str, Any]) -> Iterator[None]:
    """Set each (owner, name, value): `owner.name = value` for the duration, then the original again."""
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in replacements]
    for owner, name, value in replacements:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)
