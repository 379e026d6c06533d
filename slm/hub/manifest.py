"""What a run's model repo on the Hub holds, by name and by hash: its layout and its manifest.

The manifest (`slm-manifest.json` on `main`, and the same file in the run folder) has one entry per
checkpoint the run uploaded: its batch, tokens and samples, the checkpoint file's record, the
digest of its weights, and its export branch with a record of every file there. A record is
what the Hub itself reports for a file, so a repo can be checked against it without a download:
the size, the sha256 (the Hub's LFS id) and the git blob id (the Hub's id for a file kept in git).
The weights digest covers tensor names, dtypes, shapes and bytes, in name order, so a checkpoint
and its export (loaded with `from_pretrained`) give the same one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slm.core.errors import Refused, SlmError
from slm.core.foreign import count, mapping, optional, parsed_json, read_json, sequence, shown, text
from slm.core.run_folder import CHECKPOINT, LATEST, check_run_record
from slm.core.trust import unpickle_checkpoint

if TYPE_CHECKING:  # `slm verify` without --deep reads no tensor: it starts without torch
    import torch

REMOTE_FOLDER = "checkpoints"
MANIFEST = "slm-manifest.json"
MANIFEST_FORMAT = 1
LATEST_POINTER = f"{REMOTE_FOLDER}/{LATEST}.symlink"  # text: the remote name of the newest checkpoint
BRANCH = re.compile(r"ba(\d{1,15})")  # an export branch; its batch names files: at most 15 digits
HEX = re.compile(r"[0-9a-f]{1,128}")  # a hash recorded in a manifest
READ_CHUNK = 1 << 20


def remote_name(filename: str) -> str:
    """Return a checkpoint file's path in a run's Hub repo."""
    return f"{REMOTE_FOLDER}/{filename}"


def checked_remote_name(name: Any, where: str) -> str:
    """Return `name` (read from the Hub: a `latest` pointer's text, a manifest entry) if it names a checkpoint of a
    run's repo, `checkpoints/ep{E}-ba{B}-rank0.pt`, else refuse it in one line naming `where`."""
    folder, _, filename = name.partition("/") if isinstance(name, str) else ("", "", "")
    if not (folder == REMOTE_FOLDER and CHECKPOINT.fullmatch(filename)):
        raise Refused(f"{where} names {name!r}, which is no checkpoint of an slm run ({REMOTE_FOLDER}/"
                      "ep{E}-ba{B}-rank0.pt): refused (docs/security.md)")
    return name


def branch_name(batch: int) -> str:
    """Return the Hub branch of the checkpoint at `batch`."""
    return f"ba{batch}"


def file_record(data: Path | bytes) -> dict[str, Any]:
    """Return the size, sha256 and git blob id of a file or of bytes, as the Hub reports them."""
    size = len(data) if isinstance(data, bytes) else data.stat().st_size
    sha256, blob = hashlib.sha256(), hashlib.sha1(f"blob {size}\0".encode())
    chunks = [data] if isinstance(data, bytes) else _chunks(data)
    for chunk in chunks:
        sha256.update(chunk)
        blob.update(chunk)
    return {"size": size, "sha256": sha256.hexdigest(), "blob_id": blob.hexdigest()}


def _chunks(path: Path):
    """Yield the bytes of the file at `path`, READ_CHUNK at a time."""
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            yield chunk


def folder_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Return the record of every file under `folder`, by its path relative to it."""
    return {p.relative_to(folder).as_posix(): file_record(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def remote_record(info: Any) -> dict[str, Any]:
    """Return the record of a file the Hub lists (a `RepoFile` of `get_paths_info` or `list_repo_tree`)."""
    lfs = getattr(info, "lfs", None)
    record = {"size": info.size, "blob_id": info.blob_id}
    if lfs is not None:
        record["sha256"] = lfs["sha256"] if isinstance(lfs, Mapping) else lfs.sha256
    return record


def matches(info: Any, record: Mapping[str, Any]) -> bool:
    """Return whether the file the Hub lists is the one `record` describes: the LFS sha256 where the Hub keeps the file
    in LFS, else the git blob id; and the size."""
    remote = remote_record(info)
    key = "sha256" if "sha256" in remote else "blob_id"
    return remote["size"] == record["size"] and remote[key] == record.get(key)


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """Return the sha256 of the tensors' names, dtypes, shapes and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_weights(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Return the weights of a checkpoint's Composer state, named as in the transformers model (and its export)."""
    return {name.removeprefix("model."): tensor for name, tensor in state["model"].items()}


def weights_record(checkpoint: Path, export: Path | None = None) -> dict[str, Any]:
    """Return the batch, epoch, tokens, samples and weights digest of a checkpoint: from its export's slm-run.json when
    there is one, else from the file. (It loads tensors: call it where the training may, not from another thread.)"""
    if export is not None:
        where = str(export / "slm-run.json")
        run = check_run_record(read_json(export / "slm-run.json", "export record"), where)
        timestamp, digest = mapping(run.get("timestamp"), f"{where}: timestamp"), run.get("weights_sha256")
    else:
        state = unpickle_checkpoint(checkpoint)["state"]
        timestamp, digest = state["timestamp"]["Timestamp"], weights_digest(checkpoint_weights(state))
    return check_weights_record({"batch": timestamp.get("batch"), "epoch": timestamp.get("epoch"),
                                 "tokens": timestamp.get("token"), "samples": timestamp.get("sample"),
                                 "weights_sha256": digest}, str(export or checkpoint))


def check_file_record(record: Any, where: str) -> dict[str, Any]:
    """Return a file's record (`file_record`, read from elsewhere) once its size is a count and its hashes hex text."""
    record = mapping(record, where)
    count(record.get("size"), f"{where}: size")
    for key in ("sha256", "blob_id"):
        if record.get(key) is not None and not HEX.fullmatch(str(record[key])):
            raise Refused(f"{where}: {key} is {shown(record[key])}, not a hash (docs/security.md)")
    return record


def check_weights_record(record: Any, where: str) -> dict[str, Any]:
    """Return a checkpoint's `weights_record` (a manifest entry, a queued upload's record: read from elsewhere) once its
    batch, epoch, tokens and samples are counts and its weights digest a hash."""
    record = mapping(record, where)
    count(record.get("batch"), f"{where}: batch")
    for key in ("epoch", "tokens", "samples"):
        optional(count, record.get(key), f"{where}: {key}")
    if record.get("weights_sha256") is not None and not HEX.fullmatch(str(record["weights_sha256"])):
        raise Refused(f"{where}: weights_sha256 is {shown(record['weights_sha256'])}, not a hash (docs/security.md)")
    return record


def checkpoint_entry(path: Path, weights: dict[str, Any], export: Path | None) -> dict[str, Any]:
    """Return the manifest entry of a checkpoint file with its `weights_record`, and of its export folder (if any)."""
    entry = {**weights, "checkpoint": {"path": remote_name(path.name), **file_record(path)}, "branch": None,
             "export": None}
    if export is not None:
        entry["branch"], entry["export"] = branch_name(weights["batch"]), folder_records(export)
    return entry


class Manifest:
    """The manifest of one run's repo, kept as a file (the run folder's copy), entries by batch."""

    def __init__(self, run_name: str, entries: Mapping[int, dict] | None = None):
        self.run_name = run_name
        self.entries: dict[int, dict] = dict(entries or {})

    @classmethod
    def parse(cls, content: str | bytes, where: str) -> Manifest:
        """Read a manifest (from the run folder or the Hub: maybe someone else's), every field slm reads checked."""
        try:
            data = mapping(parsed_json(content, where), where)
            if data.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {shown(data.get('format'))}, this slm reads format {MANIFEST_FORMAT}")
            entries = {}
            for entry in sequence(data.get("checkpoints"), "its checkpoints"):
                entry = check_weights_record(mapping(entry, "an entry"), f"{where}: an entry")
                batch = entry["batch"]
                if entry.get("branch") not in (None, branch_name(batch)):
                    raise ValueError(f"the entry of batch {batch} is not an slm checkpoint's (branch "
                                     f"{shown(entry.get('branch'))})")
                checkpoint = mapping(entry.get("checkpoint"), f"batch {batch}'s checkpoint")
                checked_remote_name(checkpoint.get("path"), f"{where}, batch {batch}")
                for name, record in [("checkpoint", checkpoint),
                                     *mapping(entry.get("export") or {}, f"batch {batch}'s export").items()]:
                    check_file_record(record, f"batch {batch}'s {shown(name)}")
                entries[batch] = entry
            return cls(text(data.get("run_name"), "its run_name"), entries)
        except (SlmError, ValueError) as e:
            raise ValueError(f"{where} is no slm manifest: {e}") from e

    def to_bytes(self) -> bytes:
        """Return the manifest as its file holds it: JSON of its format, run name and entries in batch order."""
        data = {"format": MANIFEST_FORMAT, "run_name": self.run_name,
                "checkpoints": [self.entries[batch] for batch in sorted(self.entries)]}
        return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
