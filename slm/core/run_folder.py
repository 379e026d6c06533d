"""A run folder's files, read without torch: checkpoint names, whole or torn, the `latest` symlink, and the
JSON-lines files (metrics.jsonl).

Composer saves `ep{E}-ba{B}-rank0.pt` and points `latest-rank0.pt` at it. It writes the file
in place and replaces the symlink by remove-then-create, so a kill at the wrong moment leaves
a torn file or no symlink at all. Before the Trainer starts, `repair_latest` points the
symlink at the newest *whole* checkpoint (`is_complete`), and the run saves with overwrite on,
so files from beyond the resume point are simply rewritten; until then pruning leaves them out.

A file is whole when every tensor storage its pickle refers to is in the zip with its full size.
A readable zip is not enough: torch.save writes the pickle first and the storages after it, and an
exception between two of them (a second Ctrl-C, a full disk) still closes the zip, storages missing;
a kill leaves no central directory at all. Only the pickle is read, with stand-ins for every class,
so the check costs milliseconds whatever the model's size.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path

from slm.core.errors import SlmError
from slm.core.paths import partial_file

# Composer's name patterns for the CheckpointSaver; every other use of a checkpoint's name derives from these.
FILENAME = "ep{epoch}-ba{batch}-rank{rank}.pt"
LATEST_FILENAME = "latest-rank{rank}.pt"
LATEST = LATEST_FILENAME.format(rank=0)
CHECKPOINT = re.compile(re.escape(FILENAME).replace(r"\{epoch\}", r"(\d+)").replace(r"\{batch\}", r"(\d+)")
                        .replace(r"\{rank\}", "0") + "$")
METRICS = "metrics.jsonl"  # a row per logged batch (slm.training.loggers.MetricsFile)
STATE_FILE = "run-state.json"  # how the newest start stands or ended (slm.training.run_info.record_state)


def checkpoints(folder: Path) -> dict[int, Path]:
    """Return the rank-0 checkpoint files by batch."""
    found = {}
    for path in folder.glob(FILENAME.format(epoch="*", batch="*", rank=0)) if folder.is_dir() else ():
        match = CHECKPOINT.match(path.name)
        if match:
            found[int(match.group(2))] = path
    return found


class _AnyObject:
    """Stands in for every class a checkpoint's pickle names: takes any arguments, state and items."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass


# Bytes per element of the storage classes torch.save names (torch's own table, written out: importing torch takes
# seconds, and `slm status` reads checkpoints without it); a class not here asks torch.
STORAGE_ITEMSIZE = {"UntypedStorage": 1, "ByteStorage": 1, "CharStorage": 1, "BoolStorage": 1, "QUInt8Storage": 1,
                    "QInt8Storage": 1, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1, "ShortStorage": 2,
                    "HalfStorage": 2, "BFloat16Storage": 2, "IntStorage": 4, "FloatStorage": 4, "QInt32Storage": 4,
                    "LongStorage": 8, "DoubleStorage": 8, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16}


def _itemsize(storage_class: str) -> int:
    """Return the bytes per element of the torch storage class named `storage_class`."""
    if storage_class in STORAGE_ITEMSIZE:
        return STORAGE_ITEMSIZE[storage_class]
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated
        return getattr(torch, storage_class).dtype.itemsize


class _StorageSizes(pickle.Unpickler):
    """Reads a torch.save pickle for the storages it refers to, {key: bytes}, building nothing else."""

    def __init__(self, file: object) -> None:
        super().__init__(file)
        self.sizes: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> object:
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            return name  # the class's name stands in for it
        return _AnyObject

    def persistent_load(self, pid: tuple) -> _AnyObject:
        _, storage_class, key, _, numel = pid  # ("storage", "FloatStorage", "0", "cpu", numel): torch.save's
        self.sizes[key] = numel * _itemsize(storage_class)
        return _AnyObject()


def is_complete(path: Path) -> bool:
    """Return whether the checkpoint file is whole: its pickle and every storage it refers to, each with its full
    size."""
    try:
        with zipfile.ZipFile(path) as z:
            records = {info.filename: info.file_size for info in z.infolist()}
            pickles = [name for name in records if name.endswith("/data.pkl")]
            if len(pickles) != 1:
                return False
            root = pickles[0].removesuffix("data.pkl")
            with z.open(pickles[0]) as f:
                reader = _StorageSizes(f)
                reader.load()
    except Exception:  # noqa: BLE001 - anything unreadable is not whole
        return False
    return all(records.get(f"{root}data/{key}") == size for key, size in reader.sizes.items())


def newest_complete(folder: Path) -> Path | None:
    """Return the newest rank-0 checkpoint whose file is complete (what a resume starts from), if any."""
    for _, path in sorted(checkpoints(folder).items(), reverse=True):
        if is_complete(path):
            return path
    return None


def repair_latest(folder: Path, path: Path | None) -> None:
    """Point `latest-rank0.pt` at `path`, the folder's newest whole checkpoint (None: there is none)."""
    link = folder / LATEST
    if path is None:
        link.unlink(missing_ok=True)  # dangling or pointing at a torn file
    elif not (link.is_symlink() and os.readlink(link) == path.name):
        with partial_file(link) as tmp:
            tmp.symlink_to(path.name)




def json_lines(text: str, where: str) -> list[dict]:
    """Parse the rows of a JSON-lines text (blank lines skipped); one line naming `where` when one is not JSON."""
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise SlmError(f"{where} is not JSON lines ({e})") from e


def read_metrics(folder: Path) -> list[dict]:
    """Read the rows of the run folder's metrics.jsonl, one per logged batch (none when it has no such file)."""
    path = folder / METRICS
    return json_lines(path.read_text(), str(path)) if path.is_file() else []
