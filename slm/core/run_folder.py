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

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from slm.core.credentials import secret_place
from slm.core.errors import Refused
from slm.core.foreign import (
    checked_folder,
    count,
    flag,
    mapping,
    number,
    optional,
    parsed_json,
    read_bytes,
    read_json,
    sequence,
    stored_members,
    text,
)
from slm.core.paths import partial_file

# Composer's name patterns for the CheckpointSaver; every other use of a checkpoint's name derives from these.
FILENAME = "ep{epoch}-ba{batch}-rank{rank}.pt"
LATEST_FILENAME = "latest-rank{rank}.pt"
LATEST = LATEST_FILENAME.format(rank=0)
# (At most 15 digits: a name read from elsewhere becomes a label, a branch and file names, which must stay short.)
CHECKPOINT = re.compile(re.escape(FILENAME).replace(r"\{epoch\}", r"(\d{1,15})").replace(r"\{batch\}", r"(\d{1,15})")
                        .replace(r"\{rank\}", "0") + "$")
METRICS = "metrics.jsonl"  # a row per logged batch (slm.training.loggers.MetricsFile)
STATE_FILE = "run-state.json"  # how the newest start stands or ended (slm.training.run_info.record_state)
RUN_RECORD = "run.json"  # what the run is and where it ran (slm.training.run_info.RunInfo)
# W&B's folder in a run folder: W&B's own (its logs link into W&B's cache by design); slm reads nothing there, and W&B
# writes a new folder at each start and replaces its own links by renaming, never writing through one.
WANDB_FOLDER = "wandb"
STATES = ("running", "finished", "stopped", "failed")
TIMESTAMP = ("epoch", "batch", "sample", "token", "batch_in_epoch", "sample_in_epoch", "token_in_epoch")


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
    size, nothing compressed (`slm.core.foreign.stored_members`)."""
    try:
        stored_members(path, "checkpoint")
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




METRIC_NAME = re.compile(r"[\w./@:+-]{1,200}")  # metrics.jsonl's keys: loss/train/total, lr-AdamW/group0, ...


def parse_metrics(data: bytes, where: str) -> list[dict]:
    """Parse the rows of a metrics.jsonl (from a run folder or a Hub repo: read from elsewhere), each checked: a mapping
    of metric names to numbers, its `batch` and `tokens` counts; blank lines skipped."""
    if secret_place(data) is not None:
        raise Refused(f"{where} holds a secret (the value of a token, key or password this process can see): refused "
                      "(docs/security.md)")
    rows = []
    for number_, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        at = f"{where}, line {number_}"
        row = mapping(parsed_json(line, at), at)
        for key, value in row.items():
            if not METRIC_NAME.fullmatch(key):
                raise Refused(f"{at} has a key {key!r:.80}, not a metric's name (docs/security.md)")
            if key in ("batch", "tokens"):
                count(value, f"{at}: {key}")
            else:
                number(value, f"{at}: {key}")
        rows.append(row)
    return rows


def read_metrics(folder: Path) -> list[dict]:
    """Read the rows of the run folder's metrics.jsonl, one per logged batch (none when it has no such file)."""
    path = folder / METRICS
    try:
        return parse_metrics(read_bytes(path, "metrics file", None), str(path))
    except FileNotFoundError:
        return []


def check_run_record(info: Any, where: str) -> dict:
    """Return a run's record (run.json, a checkpoint's RunInfo state, an export's slm-run.json: possibly from elsewhere)
    once every field slm reads from it has its type and bounds: the names and labels text, the counts counts (the
    record's config is checked by the schema where it is used)."""
    info = mapping(info, where)
    for key in ("run_name", "tokenizer", "tokenizer_hash", "checkpoint", "checkpoint_sha256", "weights_sha256"):
        optional(text, info.get(key), f"{where}: {key}", limit=4096)
    optional(count, info.get("parameters"), f"{where}: parameters")
    config = mapping(info.get("config") or {}, f"{where}: config")
    optional(count, config.get("global_batch_size"), f"{where}: config.global_batch_size")
    optional(count, config.get("seed"), f"{where}: config.seed")
    model = mapping(config.get("model") or {}, f"{where}: config.model")
    for key in ("class", "pretrained"):
        optional(text, model.get(key), f"{where}: config.model.{key}", limit=4096)
    for i, start in enumerate(sequence(info.get("starts") or [], f"{where}: starts", at_most=2**20)):
        start = mapping(start, f"{where}: starts[{i}]")
        optional(count, start.get("batch"), f"{where}: starts[{i}].batch")
        hardware = mapping(start.get("hardware") or {}, f"{where}: starts[{i}].hardware")
        optional(count, hardware.get("processes"), f"{where}: starts[{i}].hardware.processes", at_most=2**20)
    warm = optional(mapping, info.get("warm_start"), f"{where}: warm_start") or {}
    for key in ("path", "revision", "checkpoint"):
        optional(text, warm.get(key), f"{where}: warm_start.{key}", limit=4096)
    optional(count, warm.get("batch"), f"{where}: warm_start.batch")
    optional(flag, warm.get("weights_only"), f"{where}: warm_start.weights_only")
    for key, value in mapping(info.get("metrics") or {}, f"{where}: metrics").items():
        number(value, f"{where}: metrics.{key}")
    for key, value in mapping(info.get("timestamp") or {}, f"{where}: timestamp").items():
        count(value, f"{where}: timestamp.{key}")
    return info


def read_run_record(folder: Path) -> dict | None:
    """Read the run folder's run.json, checked (`check_run_record`); None where there is none."""
    path = folder / RUN_RECORD
    try:
        return check_run_record(read_json(path, "run record"), str(path))
    except FileNotFoundError:
        return None


def check_run_state(record: Any, where: str) -> dict:
    """Return a run-state.json record (`slm.training.run_info.record_state`) once its fields are what slm writes."""
    record = mapping(record, where)
    if record.get("state") not in STATES:
        raise Refused(f"{where}: state is {str(record.get('state'))[:40]!r}, not one of {', '.join(STATES)} "
                      "(docs/security.md)")
    for key in ("time", "host", "detail"):
        optional(text, record.get(key), f"{where}: {key}")
    for key in ("pid", "batch", "exit_status"):
        optional(count, record.get(key), f"{where}: {key}", at_most=2**31)
    return record



def checked_run_folder(folder: Path) -> Path:
    """Return a run folder (maybe someone else's) once nothing in it leads outside it (slm/core/foreign.py,
    `checked_folder`), W&B's own folder aside."""
    return checked_folder(folder, "run folder", skip=(WANDB_FOLDER,))
