"""Warm starts: a new run branched off another run's checkpoint (`load.path`), and the checkpoint check both
a warm start and a resume make before Composer loads anything.

`load.path` is a checkpoint file, a run folder (its newest complete checkpoint) or a Hub model repo
that slm published (`load.revision`: the checkpoint's batch, `ba400`; default its newest). Composer
loads it only when the run folder has no checkpoint of its own: a restarted branch resumes itself.
`load.weights_only` (default) takes the weights alone: the new run has its own optimizer, schedule,
data order and batch count (a fine-tune, or a cooldown with a schedule of its own). With
`load.weights_only=false` it takes the whole training state but the run's identity (run.json's
history, the run name): the branch goes on from the checkpoint's batch exactly as the run it came
from would have, under its own config (e.g. a larger max_duration with a wsd schedule).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from composer.utils import dist

from slm.core.config import LoadConfig
from slm.core.config_rules import HUB_REPO
from slm.core.errors import Refused, SlmError
from slm.core.run_folder import CHECKPOINT, checked_run_folder, checkpoints, is_complete, newest_complete
from slm.core.trust import refuse_foreign_globals, unpickle_checkpoint
from slm.hub.client import Hub
from slm.hub.manifest import REMOTE_FOLDER

DOWNLOADS = "warm-start"  # in the run folder: a checkpoint fetched from the Hub
# What a warm start with the whole state leaves behind: the branch's own history and metrics.
IGNORE_KEYS = ["state/callbacks/RunInfo"]


def check_fits(checkpoint: Path, model: torch.nn.Module, hint: str) -> None:
    """Refuse a checkpoint whose tensors do not fit `model` (read memory-mapped: no copy of the weights)."""
    saved = unpickle_checkpoint(checkpoint, mmap=True)["state"]["model"]
    there = {k.removeprefix("model."): tuple(v.shape) for k, v in saved.items()}
    here = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(set(there) | set(here)):
        if there.get(key) != here.get(key):
            raise SlmError(f"the checkpoint {checkpoint} does not fit this model (size mismatch for {key}: "
                           f"{there.get(key, 'absent')} there, {here.get(key, 'absent')} here): {hint}")


def _from_hub(load: LoadConfig, folder: Path) -> Path:
    """Return the repo's checkpoint at `load.revision` (or its newest), downloaded once into the run folder."""
    hub = Hub()
    found = {int(m.group(2)): name for name in hub.list_files(load.path)
             if name.startswith(f"{REMOTE_FOLDER}/") and (m := CHECKPOINT.match(name.rpartition("/")[2]))}
    if not found:
        raise SlmError(f"load.path {load.path}: the Hub repo holds no slm checkpoints "
                       f"({REMOTE_FOLDER}/ep*-ba*-rank0.pt)")
    if load.revision is None:
        batch = max(found)
    elif load.revision.removeprefix("ba").isdigit() and int(load.revision.removeprefix("ba")) in found:
        batch = int(load.revision.removeprefix("ba"))
    else:
        raise SlmError(f"load.revision {load.revision}: the Hub repo {load.path} has no checkpoint at that batch; "
                       f"it has {', '.join(f'ba{b}' for b in sorted(found))}")
    name = found[batch].rpartition("/")[2]
    local = folder / DOWNLOADS / name
    if not is_complete(local):
        hub.download_file(load.path, found[batch], local)
    try:
        refuse_foreign_globals(local)
    except Refused:
        local.unlink()  # someone else's file that would run code: not kept in the run folder
        raise
    return local


def warm_start_checkpoint(load: LoadConfig, folder: Path, resumes: bool) -> Path | None:
    """Return the checkpoint file `load` names (downloaded on rank 0 when on the Hub); None without a `load.path` or
    when the run resumes itself (`resumes`: its folder has a whole checkpoint). The run's own folder is refused."""
    if load.path is None:
        return None
    source = Path(load.path).expanduser()
    if source.exists() and (source.resolve() == folder.resolve() or folder.resolve() in source.resolve().parents):
        raise SlmError(f"load.path {load.path} is in this run's own folder: a warm start makes a new run, so give "
                       "it another run_name (to resume this run, drop load.path)")
    if resumes:
        return None
    if source.is_dir():
        newest = newest_complete(checked_run_folder(source))
        if newest is None:
            raise SlmError(f"load.path {load.path} holds no complete checkpoint "
                           f"({', '.join(p.name for p in checkpoints(source).values()) or 'none at all'})")
        return newest
    if source.exists():
        return source
    if not HUB_REPO.fullmatch(load.path):
        raise SlmError(f"load.path {load.path} not found: give a checkpoint file, a run folder or a Hub repo ORG/NAME")
    local = folder / DOWNLOADS
    if dist.get_global_rank() == 0:
        local = _from_hub(load, folder)
    paths = [local]
    dist.broadcast_object_list(paths)
    return paths[0]


def warm_start_record(load: LoadConfig, checkpoint: Path) -> dict[str, Any]:
    """Return the warm start as run.json and the model card record it: where from, which checkpoint, what of it."""
    batch = CHECKPOINT.match(checkpoint.name)
    return {"path": load.path, "revision": load.revision, "checkpoint": str(checkpoint),
            "batch": int(batch.group(2)) if batch else None, "weights_only": load.weights_only}
