"""The one exception type for problems a user can fix, and the disk errors that are also the user's to fix."""

from __future__ import annotations

import errno

DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system"}


class SlmError(Exception):
    """A bad input or config: the CLI prints it as one line and exits non-zero."""


def disk_error(e: BaseException, where: str | None = None) -> str | None:
    """One line for a full or read-only disk anywhere in the exception's chain (torch.save, for one, wraps
    the OSError in a RuntimeError), naming the file, else `where`; None for anything else."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            target = e.filename or where
            return (f"{DISK_ERRORS[e.errno]}{f' writing {target}' if target else ''}: free space or write "
                    "elsewhere, then run the command again")
        e = e.__cause__ or e.__context__
    return None
