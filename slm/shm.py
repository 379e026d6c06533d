"""Removing Streaming shared memory that killed processes left behind, safely.

Streaming names its blocks `/dev/shm/NNNNNN_<name>` (plus filelocks `NNNNNN_*_filelock` in
the temp folder). A killed run leaves them behind. Streaming's own `clean_stale_shared_memory`
removes every block on the node, including those of runs still alive; this removes a prefix
only when no living process has any of its blocks mapped (`/proc/*/maps`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

SHM = Path("/dev/shm")
# streaming.base.constant's SHM_TO_CLEAN and filelock names (not imported: `import streaming` takes seconds)
STREAMING_BLOCK = re.compile(r"^(\d{6})_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times"
                             r"|resume|epoch_shape|epoch_data|barrier_filelock|cache_filelock)$")


def _prefixes_in_use() -> set[str]:
    used = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        used.update(re.findall(r"/dev/shm/(\d{6})_", text))
    return used


def _stale_paths() -> list[Path]:
    """This user's Streaming blocks and filelocks that no living process maps."""
    if not SHM.is_dir():  # not Linux: nothing we can inspect safely
        return []
    in_use = _prefixes_in_use()
    stale = []
    for folder in (SHM, Path(tempfile.gettempdir())):
        for path in folder.iterdir():
            match = STREAMING_BLOCK.match(path.name)
            try:
                if match and match.group(1) not in in_use and path.stat().st_uid == os.getuid():
                    stale.append(path)
            except OSError:  # removed meanwhile
                continue
    return stale


def stale_shared_memory() -> list[str]:
    """The names `clean_stale_shared_memory` would remove now."""
    return sorted(path.name for path in _stale_paths())


def clean_stale_shared_memory() -> list[str]:
    """Unlink this user's Streaming blocks and filelocks that no living process maps; returns their names."""
    removed = []
    for path in _stale_paths():
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:
            continue
    return sorted(removed)
