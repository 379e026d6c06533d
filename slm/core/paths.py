"""Paths in and out: whether a name is a local path or a Hub id, and the one way outputs land.

Outputs are never clobbered unless asked, and never seen half-written: a file or folder is
written beside its destination under a hidden `.NAME.partial` name and renamed into place only
once complete, so a kill or a full disk leaves the old output (or none), never a torn one.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slm.core.credentials import secret_place
from slm.core.errors import Refused, SlmError

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # NAME or ORG/NAME


def is_local_path(name: str) -> bool:
    """Return whether a string can only be a local path, never a Hub id (so a missing one is 'not found', not a
    download)."""
    return name.startswith(("/", ".", "~")) or not HUB_ID.match(name)


def refuse_secrets(values: Any, where: str) -> None:
    """Refuse to write `values` (a config, a record, a file's text or bytes: strings anywhere inside) when one holds a
    known secret, naming its key, never the value."""
    place = secret_place(values)
    if place is not None:
        raise Refused(f"{where}: '{place or 'the text'}' holds a secret (the value of a token, key or password this "
                      "process can see); slm never writes one to a file: give the value another way")


def require_output(out_dir: Any, elsewhere: Any, flag: str = "--out-repo") -> None:
    """Refuse a command that would write nowhere: it needs --out-dir, the other output (`flag`: --out-repo,
    --out-remote), or both."""
    if not (out_dir or elsewhere):
        raise SlmError(f"give --out-dir, {flag}, or both")


def places(*where: Any) -> str:
    """Say where something was written: the places given (None and empty ones left out), joined by "and"."""
    return " and ".join(str(place) for place in where if place)


def refuse_to_clobber(path: Path | None, overwrite: bool) -> None:
    """Fail early (before any slow work) if `path` holds something and --overwrite was not given."""
    if path is None or not path.exists() or overwrite:
        return
    if path.is_file() or any(path.iterdir()):
        raise SlmError(f"{path} already exists; pass --overwrite to replace it")


@contextmanager
def partial_file(out: Path) -> Iterator[Path]:
    """Yield a path beside `out` to write (a file or a symlink); renamed onto `out` if the block succeeds, else
    removed."""
    tmp = out.with_name(f".{out.name}.partial{out.suffix}")  # same suffix: writers that go by it still work
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (config.yaml, run.json, records); refused if it holds a secret."""
    refuse_secrets(text, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with partial_file(path) as tmp:
        tmp.write_text(text)


@contextmanager
def partial_folder(out_dir: Path, shared: bool = False) -> Iterator[Path]:
    """Yield a fresh folder beside `out_dir` to fill; swapped in for `out_dir` if the block succeeds, else removed.

    An old `out_dir` (only there with --overwrite) is removed last, after the new one is in place. `shared`: other
    writers (processes, hosts) may fill the same `out_dir` at once, with the same content: each fills a folder of its
    own, and the first one done is kept.
    """
    partial = out_dir.with_name(f".{out_dir.name}.partial" + (f".{socket.gethostname()}.{os.getpid()}"
                                                              if shared else ""))
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
    except OSError as e:
        raise SlmError(f"cannot write to {out_dir}: {e.strerror or e}") from e
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if shared:
        try:
            partial.rename(out_dir)
        except OSError:  # another writer's is there (an empty folder would have been replaced)
            shutil.rmtree(partial, ignore_errors=True)
            if not out_dir.is_dir():
                raise
        return
    old = out_dir.with_name(f".{out_dir.name}.old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    partial.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
