"""Per-token log-probabilities of a validation split under every checkpoint of a run (`slm logprobs`).

The artefact for studying how predictions change over training: one Parquet table per checkpoint,
one row per sample of the split, in the split's order, holding the sample's token ids and, at each
position i, log p(token i | tokens < i) (position 0, the `<bos>`, has no prediction: NaN). Each
checkpoint is written as a whole or not at all, so a re-run skips what is done and redoes the rest.

Started by a launcher (`composer -n N`, `torchrun`: RANK and WORLD_SIZE set) or as array tasks (RANK and
WORLD_SIZE set by the job), each process takes every WORLD_SIZE-th of the checkpoints, from its RANK on, and reads
the whole split itself, on its own device (LOCAL_RANK's GPU where there are GPUs): N processes write the tables
one would.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from streaming import StreamingDataset
from tqdm import tqdm

from slm.analysis.trained_models import Loaded, find_models, select
from slm.core import workarounds
from slm.core.errors import SlmError
from slm.core.paths import partial_file
from slm.data.loading import check_compatible, check_shards, collate
from slm.data.shards import read_metadata
from slm.data.tokenizer import load_tokenizer, mismatch_hint, tokenizer_matches
from slm.hub.client import Hub

HUB_FILE = "logprobs.parquet"
SCHEMA = pa.schema([("sample", pa.int64()), ("token_ids", pa.list_(pa.int32())), ("logprobs", pa.list_(pa.float32()))])


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Compute log p(token i | tokens < i) for every position, from float32 log-softmax; NaN at position 0."""
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits.float()
    picked = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return torch.cat([torch.full_like(picked[:, :1], float("nan")), picked], dim=1)


READ_ONCE = 2**30  # bytes: a split's samples up to this size are read once, for every checkpoint's table


class SplitSamples:
    """The first `count` samples of the split at `data`, in order, as token-id batches: read from the shards once
    into memory where they take at most READ_ONCE bytes (every checkpoint's table then reads them from there), else
    read from the shards batch by batch."""

    def __init__(self, data: Path, meta: dict, dataset: StreamingDataset, count: int):
        self.data, self.meta, self.dataset, self.count = data, meta, dataset, count
        self.memory = self.batch(0, count) if count * meta["seq_len"] * 8 <= READ_ONCE else None

    def batch(self, start: int, end: int) -> torch.Tensor:
        if getattr(self, "memory", None) is not None:
            return self.memory[start:end]
        return collate([self.dataset[i] for i in range(start, end)])["input_ids"]


@contextmanager
def split_samples(data: Path, max_samples: int | None = None) -> Iterator[SplitSamples]:
    """Open the first `max_samples` samples (all, if None) of the shards at `data`, checked, for the tables of one
    checkpoint or several."""
    meta = read_metadata(data)
    check_shards(data)
    with _alone(), workarounds.streaming_datasets():
        dataset = StreamingDataset(local=str(data), shuffle=False)  # read by index, in order
        yield SplitSamples(data, meta, dataset, min(dataset.num_samples, max_samples or dataset.num_samples))


def write_table(model: torch.nn.Module, split: SplitSamples, batch_size: int, out: Path, label: str) -> float:
    """Write the table of `split`'s samples under `model` to `out` (complete or not at all); the mean log p."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with partial_file(out) as tmp, pq.ParquetWriter(tmp, SCHEMA) as writer, \
            tqdm(total=split.count, unit="sample", desc=label) as bar:
        for start in range(0, split.count, batch_size):
            ids = split.batch(start, min(start + batch_size, split.count))
            logprobs = token_logprobs(model, ids.to(device)).cpu().numpy()
            total, count = total + float(logprobs[:, 1:].sum(dtype=np.float64)), count + logprobs[:, 1:].size
            n, length = ids.shape
            offsets = pa.array(np.arange(0, (n + 1) * length, length, dtype=np.int32))
            writer.write_batch(pa.record_batch([
                pa.array(np.arange(start, start + n, dtype=np.int64)),
                pa.ListArray.from_arrays(offsets, pa.array(ids.numpy().astype(np.int32).ravel())),
                pa.ListArray.from_arrays(offsets, pa.array(logprobs.astype(np.float32).ravel())),
            ], schema=SCHEMA))
            bar.update(n)
    return total / max(count, 1)


def write_checkpoint_table(loaded: Loaded, split: SplitSamples, out: Path, batch_size: int = 16) -> float:
    """Write one loaded checkpoint's table of `split` to `out`, once the split is one its model can read; the mean
    log p."""
    _check_data(loaded.model, loaded.tokenizer, split.data, split.meta)
    return write_table(loaded.model, split, batch_size, out, f"ba{loaded.batch}")


def table_of(loaded: Loaded, data: Path, batch_size: int = 16, max_samples: int | None = None) -> pa.Table:
    """Compute the table `slm logprobs` writes for one loaded checkpoint on the shards at `data`, in memory."""
    with tempfile.TemporaryDirectory(prefix="slm-logprobs-") as tmp, split_samples(data, max_samples) as split:
        write_checkpoint_table(loaded, split, Path(tmp) / HUB_FILE, batch_size)
        return pq.read_table(Path(tmp) / HUB_FILE)


def _check_data(model: torch.nn.Module, tokenizer_name: str, data: Path, meta: dict) -> None:
    """Refuse data the model cannot read, or tokenized with another tokenizer (as `slm eval` does)."""
    tokenizer = load_tokenizer(tokenizer_name)
    if not tokenizer_matches(tokenizer, meta["tokenizer"]):
        raise SlmError(f"{data} was tokenized with {meta['tokenizer']['name']}, not with the model's tokenizer"
                       f"{mismatch_hint(tokenizer, meta['tokenizer'])}")
    check_compatible([(data, meta)], model.config.vocab_size, getattr(model.config, "max_position_embeddings", None))


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


LAUNCHER_WORLD = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK")


@contextmanager
def _alone() -> Iterator[None]:
    """Open the split as a process of its own: each process reads every sample by index, where Streaming, seeing a
    launcher's RANK and WORLD_SIZE, would take it for one rank of a job sharing the split and wait on the others."""
    launcher = {name: os.environ.pop(name) for name in LAUNCHER_WORLD if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(launcher)


def _on_hub(hub: Hub, repo: str, labels: list[str]) -> set[str]:
    """Return the labels whose branch of the dataset repo already holds the table."""
    try:
        branches = hub.branches(repo, "dataset")
    except FileNotFoundError:
        return set()
    return {label for label in labels
            if label in branches and HUB_FILE in hub.list_files(repo, "dataset", revision=label)}


def write_logprobs(model: str, data: Path, out_dir: Path | None = None, out_repo: str | None = None,
                   wanted: str = "all", batch_size: int = 16, max_samples: int | None = None) -> None:
    """Write the table of every selected checkpoint of `model` to `out_dir` and/or the dataset repo `out_repo`."""
    if not (out_dir or out_repo):
        raise SlmError("give --out-dir, --out-repo, or both")
    if batch_size < 1 or (max_samples is not None and max_samples < 1):
        raise SlmError("--batch-size and --max-samples must be at least 1")
    meta = read_metadata(data)
    check_shards(data)
    chosen = select(find_models(model), wanted, model)
    if out_dir:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SlmError(f"cannot write to {out_dir}: {e.strerror or e}") from e
    hub = Hub()
    pushed = _on_hub(hub, out_repo, list(chosen)) if out_repo else set()
    rank, processes = _process()
    mine = list(chosen)[rank::processes]
    if processes > 1:
        print(f"process {rank} of {processes}: {len(mine)} of the {len(chosen)} checkpoints", flush=True)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
                          if torch.cuda.is_available() else "cpu")
    with split_samples(data, max_samples) as split:  # read once for every checkpoint, where they fit
        for label, load in ((label, chosen[label]) for label in mine):
            local = out_dir / f"{label}.parquet" if out_dir else None
            todo_local = local is not None and not local.exists()
            todo_hub = bool(out_repo) and label not in pushed
            if not (todo_local or todo_hub):
                where = " and ".join(filter(None, [str(local) if local else None,
                                                   f"hf://datasets/{out_repo}@{label}" if out_repo else None]))
                print(f"skipped {label} (already in {where})", flush=True)
                continue
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="slm-logprobs-") as tmp:
                table = local if local else Path(tmp) / "push" / HUB_FILE
                summary = f"{label}: taken from {local}"
                if todo_local or not local:
                    loaded = load(Path(tmp))
                    net, tokenizer_name = loaded.model, loaded.tokenizer
                    _check_data(net, tokenizer_name, data, meta)
                    table.parent.mkdir(parents=True, exist_ok=True)
                    mean = write_table(net.to(device), split, batch_size, table, label)
                    summary = f"{label}: {split.count:,} samples x {meta['seq_len']} tokens, mean log p {mean:.4f} nats"
                if todo_hub:
                    push = Path(tmp) / "push"
                    if table.parent != push:
                        push.mkdir(exist_ok=True)
                        shutil.copyfile(table, push / HUB_FILE)
                    hub.push_folder(push, out_repo, f"next-token log-probs of {model} at {label} on {data} by slm",
                                      repo_type="dataset", branch=label)
            where = " and ".join(filter(None, [str(local) if todo_local else None,
                                               f"hf://datasets/{out_repo}@{label}" if todo_hub else None]))
            print(f"{summary}; wrote {where} in {time.perf_counter() - start:.1f} s", flush=True)
