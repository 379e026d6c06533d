"""The cache of Hub export branches `slm.open` loads a Hub repo's checkpoints from: a folder each, kept within a
byte budget, the least recently used evicted first (docs/analysis.md, "From Python")."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from slm.core.foreign import plain_name

CACHE_BUDGET = 4 * 2**30  # bytes of Hub export branches kept in the cache folder
COMPLETE = ".complete"  # in a cached branch folder: written last, touched on each use


def default_cache() -> Path:
    """Return $SLM_CACHE, else ~/.cache/slm: where Hub export branches are kept between loads."""
    return Path(os.environ.get("SLM_CACHE") or Path.home() / ".cache" / "slm").expanduser()


class HubCache:
    """Export branches of Hub model repos, one folder each, kept within `budget` bytes: the least recently used
    go first, never the one just asked for."""

    def __init__(self, root: Path, budget: int = CACHE_BUDGET):
        self.root, self.budget = root, budget

    def folder(self, repo: str, revision: str) -> Path:
        """Return the branch `revision` of `repo`, downloaded unless it is here already."""
        org, _, name = repo.rpartition("/")
        where = self.root / "--".join(plain_name(part, "a Hub repo id's part") for part in (org or "_", name))
        folder = where / plain_name(revision, "a branch name")
        if (folder / COMPLETE).is_file():
            (folder / COMPLETE).touch()
            return folder
        from slm.hub.client import Hub

        where.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{revision}.partial-", dir=where))
        try:
            Hub().download_revision(repo, revision, partial)
            (partial / COMPLETE).touch()
            shutil.rmtree(folder, ignore_errors=True)  # an incomplete one, left by a kill
            partial.rename(folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        self.evict(keep=folder)
        return folder

    def evict(self, keep: Path) -> None:
        """Remove the least recently used branches until the cache fits its budget (`keep` stays)."""
        cached = sorted(self.root.glob(f"*/*/{COMPLETE}"), key=lambda marker: marker.stat().st_mtime)
        sizes = {marker.parent: sum(f.stat().st_size for f in marker.parent.rglob("*") if f.is_file())
                 for marker in cached}
        total = sum(sizes.values())
        for marker in cached:
            if total <= self.budget:
                break
            if marker.parent != keep:
                shutil.rmtree(marker.parent)
                total -= sizes[marker.parent]
