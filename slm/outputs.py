"""The one rule for output paths: never clobber what is there unless told to."""

from __future__ import annotations

import shutil
from pathlib import Path

from slm.errors import SlmError


def refuse_to_clobber(path: Path | None, overwrite: bool) -> None:
    """Fail early (before any slow work) if `path` holds something and --overwrite was not given."""
    if path is None or not path.exists() or overwrite:
        return
    if path.is_file() or any(path.iterdir()):
        raise SlmError(f"{path} already exists; pass --overwrite to replace it")


def move_into_place(partial: Path, out_dir: Path) -> None:
    """Swap a finished folder in; an old one (only there with --overwrite) is removed last."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    partial.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
