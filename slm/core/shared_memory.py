"""Streaming shared memory on one node: a lock that keeps runs starting together out of each other's way, and
removing the blocks that killed processes left behind, safely.

Streaming names its blocks `/dev/shm/NNNNNN_<name>` (plus filelocks `NNNNNN_*_filelock` in
the temp folder), NNNNNN a prefix each dataset registers for itself. A killed run leaves them behind.
Streaming's own `clean_stale_shared_memory` removes every block on the node, including those of runs
still alive; this removes a prefix only when no living process has any of its blocks mapped
(`/proc/*/maps`), holding the node's lock, which a registering dataset holds too
(slm/core/streaming_workarounds.py, `prefix_registered_under_node_lock`): a prefix is either not registered yet or
mapped by the process that registered it, never caught in between.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SHM = Path("/dev/shm")
# streaming.base.constant's SHM_TO_CLEAN and filelock names (not imported: `import streaming` takes seconds)
STREAMING_BLOCK = re.compile(r"^(\d{6})_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times"
                             r"|resume|epoch_shape|epoch_data|barrier_filelock|cache_filelock)$")
LOCK_NAME = "slm-streaming-prefixes.lock"


@contextmanager
def node_lock() -> Iterator[None]:
    """Hold this node's lock on Streaming's prefixes (a file in /dev/shm, shared by every user and every run here)."""
    folder = SHM if SHM.is_dir() else Path(tempfile.gettempdir())
    # flock needs no write access, so any user's file serves; a link planted there is not followed
    fd = os.open(folder / LOCK_NAME, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _prefixes_in_use() -> set[str]:
    """Return the Streaming prefixes of which a living process maps a /dev/shm block (read from /proc/*/maps)."""
    used = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        used.update(re.findall(r"/dev/shm/(\d{6})_", text))
    return used


def _stale_paths() -> list[Path]:
    """Find this user's Streaming blocks and filelocks that no living process maps.

    The candidates are listed before the living processes' maps are read: a block made meanwhile is not a
    candidate, and one made before is mapped by then (its prefix was registered under the node's lock)."""
    if not SHM.is_dir():  # not Linux: nothing we can inspect safely
        return []
    candidates = []
    for folder in (SHM, Path(tempfile.gettempdir())):
        for path in folder.iterdir():
            match = STREAMING_BLOCK.match(path.name)
            try:
                if match and path.stat().st_uid == os.getuid():
                    candidates.append((match.group(1), path))
            except OSError:  # removed meanwhile
                continue
    in_use = _prefixes_in_use()
    return [path for prefix, path in candidates if prefix not in in_use]


def stale_shared_memory() -> list[str]:
    """Return the names `clean_stale_shared_memory` would remove now."""
    return sorted(path.name for path in _stale_paths())


def clean_stale_shared_memory() -> list[str]:
    """Unlink this user's Streaming blocks and filelocks that no living process maps; returns their names."""
    removed = []
    with node_lock():
        for path in _stale_paths():
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:
                continue
    return sorted(removed)
