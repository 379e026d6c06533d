"""Reading what slm did not write in this run (docs/security.md): the one layer every command reads input from elsewhere
through.

- A folder from elsewhere (a run folder resumed or studied, a shard folder, an export, a Hub download, a folder of
  tables) is checked once, before anything in it is read or written: `checked_folder` refuses a link in it, at any
  depth and under any name (one slm will create included), that leads outside it, and anything but files, folders
  and links. What slm writes there goes beside its destination and is renamed into place
  (slm/core/paths.py, `partial_file`), which replaces a link instead of writing through it.
- A file from elsewhere is read with `read_bytes`, `read_json` or `read_yaml`: a regular file (a
  FIFO or a device would block or never end), within a size bound, its parse errors one line.
- A value read from such a file that becomes a path, a file name, a branch, a label, a count or a size is checked
  where it is read: `plain_name`, `count`, `text`, `number`, `flag`, `mapping`, `sequence`.
- A zip from elsewhere (a checkpoint, an npz) is read only when `stored_members` holds: no member compressed, all
  within the file, so reading it takes no more memory than its size.
Each refusal is one line naming the file, the value and why (`slm.core.errors.Refused`).
"""

from __future__ import annotations

import json
import math
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

from slm.core.credentials import secret_place
from slm.core.errors import Refused, SlmError

RECORD_LIMIT = 64 * 2**20  # bytes of a record slm reads whole (run.json, index.json, a manifest, a config)
TEXT_LIMIT = 1024  # characters of a name, a label or a line of text read from a record
MAX_COUNT = 2**53  # the largest whole number a JSON number holds exactly: far past any batch, token or byte count
SECURITY = "(docs/security.md)"


def shown(value: Any) -> str:
    """Return a value read from elsewhere as an error line shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


# -- folders -------------------------------------------------------------------------------------------------------

def checked_folder(folder: Path | str, what: str, skip: tuple[str, ...] = ()) -> Path:
    """Return `folder` (a folder from elsewhere: `what` names it in a refusal) once nothing in it leads outside it: no
    link, at any depth, resolving outside the folder, and nothing but files, folders and links. A folder that is not
    there is returned as it is (its reader says it is missing). `skip`: subfolders of a library's own that slm neither
    reads nor writes (a run folder's `wandb/`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return folder
    root = folder.resolve()
    for parent, folders, files in os.walk(root):  # never into a linked folder: the link itself is checked
        if Path(parent) == root:
            folders[:] = [name for name in folders if name not in skip]
        for name in folders + files:
            path = Path(parent, name)
            try:
                mode = path.lstat().st_mode
            except FileNotFoundError:  # removed meanwhile
                continue
            inside = path.relative_to(root)
            if stat.S_ISLNK(mode):
                try:
                    target = path.resolve()
                except (OSError, RuntimeError):  # a loop of links
                    target = None
                if target is None or not target.is_relative_to(root):
                    raise Refused(f"{what} {folder} holds {inside}, a link to {os.readlink(path)}, which leads outside "
                                  f"it: slm reads and writes only inside a folder from elsewhere {SECURITY}; put the "
                                  "file itself there, or link the whole folder", str(path))
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise Refused(f"{what} {folder} holds {inside}, which is no file or folder (a pipe, socket or device "
                              f"would block or never end): refused {SECURITY}", str(path))
    return folder


def checked_file(path: Path | str, what: str) -> Path:
    """Return `path` (a file from elsewhere that slm reads and may write again: a table) once it is no link leading
    out of its folder, as `checked_folder` holds for every file of a folder."""
    path = Path(path)
    if path.is_symlink() and not path.resolve().is_relative_to(path.parent.resolve()):
        raise Refused(f"{what} {path} is a link to {os.readlink(path)}, which leads outside its folder: refused "
                      f"{SECURITY}; put the file itself there", str(path))
    return path


# -- files ---------------------------------------------------------------------------------------------------------

def read_bytes(path: Path | str, what: str, limit: int | None = RECORD_LIMIT) -> bytes:
    """Return the content of a file from elsewhere (`what` names it), refusing anything but a regular file, or one over
    `limit` bytes (None: a table as long as its run, read whole). FileNotFoundError where there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opened without O_NONBLOCK waits for a writer
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no such file: {path}") from None
    except OSError as e:
        raise SlmError(f"cannot read {what} {path}: {e.strerror or e}") from e
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Refused(f"{what} {path} is no regular file: refused {SECURITY}", str(path))
        if limit is not None and info.st_size > limit:
            raise Refused(f"{what} {path} is {info.st_size:,} bytes, more than the {limit:,} of any slm {what}: "
                          f"refused {SECURITY}", str(path))
        return f.read(info.st_size if limit is None else limit)


def parsed_json(data: bytes | str, where: str) -> Any:
    """Parse JSON read from elsewhere; one line naming `where` when it is not JSON (too deep, a number of thousands of
    digits, not UTF-8 included)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        problem = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise SlmError(f"{where} is not valid JSON ({problem}): it is truncated, corrupt or not slm's") from e


def read_json(path: Path | str, what: str, limit: int = RECORD_LIMIT) -> Any:
    """Read a JSON file from elsewhere (`read_bytes`, then `parsed_json`)."""
    return parsed_json(read_bytes(path, what, limit), f"{what} {path}")


def read_yaml(path: Path | str, what: str, limit: int = RECORD_LIMIT) -> Any:
    """Read a YAML file from elsewhere: plain data only, no aliases (a few lines of them expand to gigabytes once the
    references are copied, as OmegaConf does)."""
    import yaml

    text = read_bytes(path, what, limit)
    try:
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise Refused(f"{what} {path} uses YAML aliases, which slm never writes: refused {SECURITY}", str(path))
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        problem = " ".join(str(e).split())[:200]
        raise SlmError(f"{what} {path} is not valid YAML ({problem}): it is truncated, corrupt or not slm's") from None


def stored_members(path: Path | str, what: str) -> list[zipfile.ZipInfo]:
    """Return the members of a zip from elsewhere (`what`: a checkpoint, an npz) once none is compressed and all fit
    within the file, so that reading any costs no more memory than the file's size; a zip slm or torch wrote stores
    its members as they are."""
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise SlmError(f"cannot read {what} {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED or member.file_size != member.compress_size:
            raise Refused(f"{what} {path}: its member {shown(member.filename)} is compressed ({member.file_size:,} "
                          f"bytes from {member.compress_size:,}), which no {what} slm writes is: refused {SECURITY}",
                          str(path))
    if sum(member.file_size for member in members) > size:
        raise Refused(f"{what} {path}: its members add up to more than its {size:,} bytes: refused {SECURITY}",
                      str(path))
    return members


# -- values ----------------------------------------------------------------------------------------------------------

def plain_name(name: Any, what: str, below: bool = False) -> str:
    """Return `name` (read from a file) if it is a plain file name (with `below`, a relative path that only goes down),
    else refuse it in one line naming `what`: an absolute path, `..`, `.`, an empty part, a backslash, a control
    character or a part longer than a file name may be would lead outside the folder it is joined to, or nowhere."""
    parts = name.split("/") if isinstance(name, str) else [""]
    bad = (any(p in ("", ".", "..") or len(p.encode()) > 255 for p in parts) or "\\" in name
           or any(ord(c) < 32 for c in name) or (len(parts) > 1 and not below))
    if bad:
        kind = "a relative path below its folder" if below else "a plain file name"
        raise Refused(f"{what} names {shown(name)}, which is not {kind}: refused, since it would lead outside its "
                      f"folder {SECURITY}")
    return name


def count(value: Any, what: str, at_most: int = MAX_COUNT) -> int:
    """Return `value` if it is a whole number from 0 to `at_most` (a batch, a count of tokens or bytes, a pid)."""
    if type(value) is not int or not 0 <= value <= at_most:
        raise Refused(f"{what} is {shown(value)}, not a whole number from 0 to {at_most:,}: the file is corrupt or "
                      f"not slm's {SECURITY}")
    return value


def text(value: Any, what: str, limit: int = TEXT_LIMIT) -> str:
    """Return `value` if it is a string of at most `limit` characters, without control characters (it is shown in one
    line) and without a secret (it may be shown or written)."""
    if not isinstance(value, str) or len(value) > limit or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise Refused(f"{what} is {shown(value)}, not a line of text of at most {limit:,} characters: the file is "
                      f"corrupt or not slm's {SECURITY}")
    if secret_place(value) is not None:
        raise Refused(f"{what} holds a secret (the value of a token, key or password this process can see): refused "
                      f"{SECURITY}")
    return value


NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}  # how metrics.jsonl keeps non-finite values


def number(value: Any, what: str) -> float:
    """Return `value` as a float if it is a number (or "nan", "inf", "-inf", as slm writes non-finite values)."""
    if isinstance(value, str) and value in NON_FINITE:
        return NON_FINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 1e300:
        raise Refused(f"{what} is {shown(value)}, not a number: the file is corrupt or not slm's {SECURITY}")
    return float(value)


def flag(value: Any, what: str) -> bool:
    """Return `value` if it is a bool, else refuse it in one line naming `what`."""
    if not isinstance(value, bool):
        raise Refused(f"{what} is {shown(value)}, not true or false: the file is corrupt or not slm's {SECURITY}")
    return value


def mapping(value: Any, what: str) -> dict:
    """Return `value` if it is a dict, else refuse it in one line naming `what`."""
    if not isinstance(value, dict):
        raise Refused(f"{what} is {shown(value)}, not a mapping: the file is corrupt or not slm's {SECURITY}")
    return value


def sequence(value: Any, what: str, at_most: int = MAX_COUNT) -> list:
    """Return `value` if it is a list of at most `at_most` items, else refuse it in one line naming `what`."""
    if not isinstance(value, list) or len(value) > at_most:
        raise Refused(f"{what} is {shown(value)}, not a list of at most {at_most:,}: the file is corrupt or not slm's "
                      f"{SECURITY}")
    return value


def optional(check: Any, value: Any, what: str, **kwargs: Any) -> Any:
    """Return None for None, else `check(value, what)`."""
    return None if value is None else check(value, what, **kwargs)
