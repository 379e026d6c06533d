"""Which checkpoints a MODEL argument names (a run folder, a checkpoint file, an `slm export` folder, a Hub model
repo's `ba{B}` branches), by label `ba{B}`, each loaded only when asked: what `slm eval` and `slm logprobs` read."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from slm.core.errors import SlmError
from slm.core.foreign import checked_folder, read_json
from slm.core.paths import is_local_path
from slm.core.run_folder import check_run_record, checked_run_folder, checkpoints, is_complete
from slm.data.tokenizer import load_tokenizer
from slm.hub.client import Hub
from slm.training.export import model_from_checkpoint, read_checkpoint
from slm.training.model import load_pretrained

LABEL = re.compile(r"ba(\d{1,15})")  # a checkpoint's label, a Hub branch: at most 15 digits (it names files)
EXPORT_RECORD = "slm-run.json"


@dataclass
class Loaded:
    """A checkpoint's model, its tokenizer's name (and content hash, where recorded), and where in its run it was taken
    (None where unknown)."""

    model: torch.nn.Module
    tokenizer_name: str  # a folder or Hub id (load_tokenizer loads it)
    run: str | None = None
    batch: int | None = None
    tokens: int | None = None
    tokenizer_hash: str | None = None

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The checkpoint's tokenizer, loaded once for every use (only if it is the one its recorded content hash
        names, where there is one)."""
        return load_tokenizer(self.tokenizer_name, content_hash=self.tokenizer_hash)


# A checkpoint's loader: given a scratch folder that lives while the model is used, the loaded checkpoint.
Loader = Callable[[Path], Loaded]


def load_checkpoint(path: Path) -> Loaded:
    """Load a checkpoint file of slm/train.py."""
    state = read_checkpoint(path)
    info, timestamp = state["callbacks"]["RunInfo"], state["timestamp"]["Timestamp"]
    return Loaded(model_from_checkpoint(state, str(path)), info["tokenizer"], info.get("run_name"), timestamp["batch"],
                  timestamp["token"], info.get("tokenizer_hash"))


def export_record(folder: Path) -> dict:
    """Read an export folder's slm-run.json, checked (`check_run_record`: its labels and counts); {} where there is
    none (a save_pretrained folder of another tool)."""
    try:
        return check_run_record(read_json(folder / EXPORT_RECORD, "export record"), str(folder / EXPORT_RECORD))
    except FileNotFoundError:
        return {}


def load_export(folder: Path) -> Loaded:
    """Load a folder written by `slm export` (or any save_pretrained folder: then without run, batch and tokens)."""
    checked_folder(folder, "export folder")
    if not (folder / "config.json").exists():
        raise SlmError(f"{folder} is neither a checkpoint file nor an exported model folder (no config.json)")
    run = export_record(folder)
    timestamp = run.get("timestamp", {})
    model = load_pretrained(str(folder), "the exported model").eval()  # safetensors: weights that run no code
    return Loaded(model, str(folder), run.get("run_name"), timestamp.get("batch"), timestamp.get("token"))


def load_model(path: Path) -> Loaded:
    """Load a checkpoint file of slm/train.py or a `slm export` folder."""
    return load_checkpoint(path) if path.is_file() else load_export(path)


def find_models(model: str) -> dict[str, Loader]:
    """Find the checkpoints MODEL names, by label `ba{B}`, in training order; nothing is loaded yet but a lone .pt."""
    path = Path(model).expanduser()
    if not path.exists():
        if is_local_path(model):
            raise SlmError(f"model not found: {model}")
        return _hub_models(model)
    if path.is_file():
        loaded = load_checkpoint(path)
        return {f"ba{loaded.batch}": lambda _: loaded}
    if (path / "config.json").exists():
        return {_export_label(checked_folder(path, "export folder")): lambda _: load_export(path)}
    checked_run_folder(path)
    found = {f"ba{batch}": file for batch, file in sorted(checkpoints(path).items()) if is_complete(file)}
    if not found:
        raise SlmError(f"{path} holds no complete checkpoint (ep*-ba*-rank0.pt) and is not a folder written by "
                       "`slm export` (no config.json)")
    return {label: lambda _, file=file: load_checkpoint(file) for label, file in found.items()}


def _export_label(folder: Path) -> str:
    """Return an export's label: `ba{B}` of its record's batch (checked: a count), else the folder's name."""
    batch = export_record(folder).get("timestamp", {}).get("batch")
    return folder.name if batch is None else f"ba{batch}"


def _hub_models(repo: str) -> dict[str, Loader]:
    """Return the `ba{B}` branches of a Hub model repo (each an `slm export` folder), downloaded when loaded."""
    try:
        branches = Hub().branches(repo)
    except FileNotFoundError:
        raise SlmError(f"model not found: {repo} is neither a local path nor a Hub model repo") from None
    labels = sorted((b for b in branches if LABEL.fullmatch(b)), key=lambda b: int(b[2:]))
    if not labels:
        raise SlmError(f"the Hub repo {repo} has no checkpoint branches (ba{{B}}, written by hub.export)")
    return {label: lambda tmp, label=label: load_export(Hub().download_revision(repo, label, tmp / label))
            for label in labels}


def select(found: dict[str, Loader], wanted: str, model: str) -> dict[str, Loader]:
    """Select the checkpoints `--checkpoints` names ('all' or a comma list of labels)."""
    if wanted == "all":
        return found
    labels = [label.strip() for label in wanted.split(",") if label.strip()]
    unknown = [label for label in labels if label not in found]
    if unknown or not labels:
        raise SlmError(f"no checkpoint {', '.join(unknown) or repr(wanted)} in {model}; it has: {', '.join(found)}")
    return {label: found[label] for label in labels}
