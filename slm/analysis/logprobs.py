"""Per-token log-probabilities of a validation split under every checkpoint of runs (`slm logprobs`).

The artefact for studying how predictions change over training: one Parquet table per checkpoint,
one row per sample of the split, in the split's order, holding the sample's token ids and, at each
position i, log p(token i | tokens < i) (position 0, the `<bos>`, has no prediction: NaN). Each
checkpoint is written as a whole or not at all, so a re-run skips what is done and redoes the rest.
A table's schema metadata records how it was computed (precision, batch size, device).

On a GPU the forward pass runs under bf16 autocast and the log-softmax in float32, in batches sized to the device's
free memory; on a CPU everything is float32, in batches of 16 (both can be set).

Started by a launcher (`composer -n N`, `torchrun`: RANK and WORLD_SIZE set) or as array tasks (RANK and
WORLD_SIZE set by the job), each process takes every WORLD_SIZE-th of the checkpoints (of all the runs given), from
its RANK on, and reads the whole split itself, on its own device (LOCAL_RANK's GPU where there are GPUs): N
processes write the tables one would.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from slm.analysis.samples import SplitSamples, check_data, split_samples
from slm.analysis.trained_models import Loaded, find_models, select
from slm.core.errors import SlmError
from slm.core.foreign import plain_name
from slm.core.paths import partial_file, places, require_output
from slm.data.loading import check_shards
from slm.data.shards import read_metadata
from slm.hub.client import Hub

HUB_FILE = "logprobs.parquet"
SCHEMA = pa.schema([("sample", pa.int64()), ("token_ids", pa.list_(pa.int32())), ("logprobs", pa.list_(pa.float32()))])


PRECISIONS = ("float32", "bf16")


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, precision: str = "float32") -> torch.Tensor:
    """Compute log p(token i | tokens < i) for every position, from float32 log-softmax (the forward pass under bf16
    autocast if `precision` is "bf16"); NaN at position 0."""
    with torch.no_grad(), torch.autocast(input_ids.device.type, torch.bfloat16, enabled=precision == "bf16"):
        logits = model(input_ids, use_cache=False).logits.float()
    picked = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return torch.cat([torch.full_like(picked[:, :1], float("nan")), picked], dim=1)


def compute_device() -> torch.device:
    """Return the device this process computes on: LOCAL_RANK's GPU (0 without a launcher) where there are GPUs, else
    the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")


def default_precision(device: torch.device) -> str:
    """Return the precision of a forward pass on `device`: bf16 on a GPU that has it, else float32."""
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


BYTES_A_LOGIT = 16  # the logits (bf16 and their float32 copy) and the float32 log-softmax, per sample, position, id


def default_batch_size(model: torch.nn.Module, seq_len: int, device: torch.device) -> int:
    """Return the samples a batch: 16 on a CPU; on a GPU, as many as let a batch's logits take half its free memory
    (the rest for the weights and activations), at most 1,024."""
    if device.type != "cuda":
        return 16
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(1024, free // 2 // (seq_len * model.config.vocab_size * BYTES_A_LOGIT)))


@dataclass(frozen=True)
class Reading:
    """How the tables are computed: the batch size (None: `default_batch_size`), the forward pass's precision
    (None: `default_precision`) and the device."""

    batch_size: int | None = None
    precision: str | None = None
    device: torch.device = field(default_factory=compute_device)

    def __post_init__(self):
        if self.batch_size is not None and self.batch_size < 1:
            raise SlmError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.precision not in (None, *PRECISIONS):
            raise SlmError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")

    def on(self, model: torch.nn.Module, seq_len: int) -> tuple[torch.nn.Module, int, str]:
        """Return `model` on the device, the batch size and the precision to read `seq_len`-token samples with."""
        model = model.to(self.device)
        return (model, self.batch_size or default_batch_size(model, seq_len, self.device),
                self.precision or default_precision(self.device))


def write_table(model: torch.nn.Module, split: SplitSamples, out: Path, label: str,
                reading: Reading | None = None) -> float:
    """Write the table of `split`'s samples under `model` to `out` (complete or not at all); the mean log p."""
    model, batch_size, precision = (reading or Reading()).on(model, split.meta["seq_len"])
    device = next(model.parameters()).device
    total, count = 0.0, 0
    schema = SCHEMA.with_metadata({"slm.precision": precision, "slm.batch_size": str(batch_size),
                                   "slm.device": device.type})
    with partial_file(out) as tmp, pq.ParquetWriter(tmp, schema) as writer, \
            tqdm(total=split.count, unit="sample", desc=label) as bar:
        for start, ids in split.batches(batch_size):
            logprobs = token_logprobs(model, ids.to(device), precision).cpu().numpy()
            total, count = total + float(logprobs[:, 1:].sum(dtype=np.float64)), count + logprobs[:, 1:].size
            n, length = ids.shape
            offsets = pa.array(np.arange(0, (n + 1) * length, length, dtype=np.int32))
            writer.write_batch(pa.record_batch([
                pa.array(np.arange(start, start + n, dtype=np.int64)),
                pa.ListArray.from_arrays(offsets, pa.array(ids.numpy().astype(np.int32).ravel())),
                pa.ListArray.from_arrays(offsets, pa.array(logprobs.astype(np.float32).ravel())),
            ], schema=schema))
            bar.update(n)
    return total / max(count, 1)


def write_checkpoint_table(loaded: Loaded, split: SplitSamples, out: Path, reading: Reading | None = None,
                           label: str | None = None) -> float:
    """Write one loaded checkpoint's table of `split` to `out`, once the split is one its model can read; the mean
    log p."""
    check_data(loaded, split)
    return write_table(loaded.model, split, out, label or f"ba{loaded.batch}", reading)


def table_of(loaded: Loaded, data: Path, batch_size: int | None = None, max_samples: int | None = None) -> pa.Table:
    """Compute the table `slm logprobs` writes for one loaded checkpoint on the shards at `data`, in memory."""
    with tempfile.TemporaryDirectory(prefix="slm-logprobs-") as tmp, split_samples(data, max_samples) as split:
        write_checkpoint_table(loaded, split, Path(tmp) / HUB_FILE, Reading(batch_size))
        return pq.read_table(Path(tmp) / HUB_FILE)


def _process() -> tuple[int, int]:
    """Return this process's rank and the number of processes, as a launcher or a job sets RANK and WORLD_SIZE."""
    try:
        rank, processes = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise SlmError("RANK and WORLD_SIZE must be whole numbers (they divide the checkpoints among processes), "
                       f"got {os.environ.get('RANK')!r} and {os.environ.get('WORLD_SIZE')!r}") from None
    if not 0 <= rank < processes:
        raise SlmError(f"RANK {rank} is not one of the WORLD_SIZE {processes} processes: set 0 <= RANK < WORLD_SIZE")
    return rank, processes


def _on_hub(hub: Hub, repo: str, labels: list[str]) -> set[str]:
    """Return the labels whose branch of the dataset repo already holds the table."""
    try:
        branches = hub.branches(repo, "dataset")
    except FileNotFoundError:
        return set()
    return {label for label in labels
            if label in branches and HUB_FILE in hub.list_files(repo, "dataset", revision=label)}


def run_names(models: list[str]) -> dict[str, str]:
    """Return the folder of `--out-dir` each MODEL's tables go in: the last part of its path or repo name (with one
    MODEL, the out dir itself: "")."""
    if len(models) == 1:
        return {models[0]: ""}
    names = {model: plain_name(Path(model.rstrip("/")).name, "a MODEL's name") for model in models}
    repeated = sorted({name for name in names.values() if list(names.values()).count(name) > 1})
    if repeated:
        raise SlmError(f"two MODELs end in the same name ({', '.join(repeated)}): their tables would share "
                       "--out-dir/NAME; give them in separate calls")
    return names


def write_logprobs(models: list[str], data: Path, out_dir: Path | None = None, out_repo: str | None = None,
                   wanted: str = "all", reading: Reading | None = None, max_samples: int | None = None) -> None:
    """Write the table of every selected checkpoint of each MODEL to `out_dir` (of several MODELs: to
    `out_dir/NAME`, NAME the end of MODEL's path or repo) and/or, of one MODEL, the dataset repo `out_repo`."""
    reading = reading or Reading()
    require_output(out_dir, out_repo)
    if out_repo and len(models) > 1:
        raise SlmError("--out-repo takes the tables of one MODEL (a branch per checkpoint): push each run in its own "
                       "call, or give --out-dir")
    if max_samples is not None and max_samples < 1:
        raise SlmError(f"--max-samples must be at least 1, got {max_samples}")
    meta = read_metadata(data)
    check_shards(data)
    names = run_names(models)
    chosen = [(model, label, load) for model in models for label, load in select(find_models(model), wanted,
                                                                                 model).items()]
    if out_dir:
        try:
            for name in set(names.values()):
                (out_dir / name).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SlmError(f"cannot write to {out_dir}: {e.strerror or e}") from e
    hub = Hub()
    pushed = _on_hub(hub, out_repo, [label for _, label, _ in chosen]) if out_repo else set()
    rank, processes = _process()
    mine = chosen[rank::processes]
    if processes > 1:
        print(f"process {rank} of {processes}: {len(mine)} of the {len(chosen)} checkpoints", flush=True)
    with split_samples(data, max_samples) as split:  # read once for every checkpoint, where they fit
        for model, label, load in mine:
            named = f"{names[model]}/{label}" if names[model] else label
            local = out_dir / names[model] / f"{label}.parquet" if out_dir else None
            todo_local = local is not None and not local.exists()
            todo_hub = bool(out_repo) and label not in pushed
            if not (todo_local or todo_hub):
                where = places(local, out_repo and f"hf://datasets/{out_repo}@{label}")
                print(f"skipped {named} (already in {where})", flush=True)
                continue
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="slm-logprobs-") as tmp:
                table = local if local else Path(tmp) / "push" / HUB_FILE
                summary = f"{named}: taken from {local}"
                if todo_local or not local:
                    table.parent.mkdir(parents=True, exist_ok=True)
                    mean = write_checkpoint_table(load(Path(tmp)), split, table, reading, named)
                    summary = f"{named}: {split.count:,} samples x {meta['seq_len']} tokens, mean log p {mean:.4f} nats"
                if todo_hub:
                    push = Path(tmp) / "push"
                    if table.parent != push:
                        push.mkdir(exist_ok=True)
                        shutil.copyfile(table, push / HUB_FILE)
                    hub.push_folder(push, out_repo, f"next-token log-probs of {model} at {label} on {data} by slm",
                                    repo_type="dataset", branch=label)
            where = places(todo_local and local, todo_hub and f"hf://datasets/{out_repo}@{label}")
            print(f"{summary}; wrote {where} in {time.perf_counter() - start:.1f} s", flush=True)
