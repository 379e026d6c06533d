"""Training data: Streaming's `StreamingDataset` over the MDS folders `slm tokenize` writes (one per split, or
a mixture: `data.{train,eval}.streams`, each a Streaming `Stream`).

Streaming does the shuffling (seeded, independent of the init seed), the split of each
global batch across processes, and exact mid-epoch resumption (Composer saves its state
in every checkpoint), so nothing is spun through on resume. `MappedShards` (slm/data/mapped_shards.py)
keeps all of that and only reads each sample's bytes faster. Here: the checks of the shards against
each other and the model, and the datasets and loaders built from the config.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.core import DataSpec
from composer.utils import dist
from streaming import Stream
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from slm.core.config import DataConfig, DataSplit, StreamConfig
from slm.core.errors import SlmError
from slm.core.foreign import checked_folder, mapping, read_json
from slm.core.shard_index import checked_index
from slm.data.mapped_shards import MappedShards
from slm.data.shards import read_metadata
from slm.data.tokenizer import mismatch_hint, tokenizer_matches

SHM_ATTEMPTS = 5
_jitter = random.Random()  # its own state: the global one is the training's


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Return a training batch of samples: their tokens as input_ids and as labels (int64)."""
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    return {"input_ids": tokens, "labels": tokens.clone()}


def split_streams(split: DataSplit, name: str) -> list[tuple[str, StreamConfig]]:
    """Return (label, stream config: local folder and remote) of each MDS folder of the split `data.NAME`: the split's
    own (label `data.NAME`), or each of its streams (label `data.NAME.streams.STREAM`), in config order."""
    if split.streams:
        return [(f"data.{name}.streams.{stream}", folder) for stream, folder in split.streams.items()]
    return [(f"data.{name}", StreamConfig(local=split.local, remote=split.remote))]


def describe_split(split: dict) -> str:
    """Describe a split of a run's config, as run.json keeps it, in a line: its folder, or
    `web (0.7): PATH, code (0.3): PATH` (a stream's remote when it has one)."""
    def weight(stream: dict) -> str:
        if stream.get("proportion") is not None:
            return f" ({stream['proportion']:g})"
        return f" (repeat {stream['repeat']:g})" if stream.get("repeat") is not None else ""

    streams = split.get("streams") or {}
    return ", ".join(f"{name}{weight(s)}: {s.get('remote') or s.get('local')}" for name, s in streams.items()) or \
        str(split.get("remote") or split.get("local"))


def split_metadatas(split: DataSplit, name: str) -> list[tuple[str, dict]]:
    """Read (label, slm-dataset.json) of each MDS folder of the split (`split_streams`), each folder's shards
    checked."""
    return [(label, folder_metadata(folder, label)) for label, folder in split_streams(split, name)]


def _fetch(remote: str, name: str, local: Path, label: str) -> None:
    """Fetch the remote's file `name` into `local`, unless there: written under a name of this process's own and renamed
    into place, so processes fetching it at once never see it half-written."""
    from streaming.base.storage import CloudDownloader

    if (local / name).exists():
        return
    local.mkdir(parents=True, exist_ok=True)
    partial = local / f".{name}.{os.getpid()}.partial"
    try:
        CloudDownloader.direct_download(f"{remote.rstrip('/')}/{name}", str(partial), 60)
        os.replace(partial, local / name)
    except Exception as e:
        partial.unlink(missing_ok=True)
        raise SlmError(f"cannot fetch {name} of {label} from {remote}: {e}") from e


def folder_metadata(folder: StreamConfig, label: str) -> dict:
    """Read the folder's `slm-dataset.json`, fetched from its remote when only the remote has it; its shards checked
    (a remote's index.json is fetched first, so its names are checked before Streaming reads any shard)."""
    local = checked_folder(Path(folder.local), "shard folder")
    if folder.remote:
        for name in ("slm-dataset.json", "index.json"):
            _fetch(folder.remote, name, local, label)
    elif not (local / "index.json").exists():
        raise SlmError(f"{label}.local = {local} holds no MDS shards (no index.json): make them with "
                       f"`slm tokenize`, or set {label}.local to the right folder")
    check_shards(local, hashes=dist.get_local_rank() == 0, complete=not folder.remote)  # one node reader hashes
    return read_metadata(local)


def check_shards(folder: Path, hashes: bool = True, complete: bool = True) -> None:
    """Refuse a folder (maybe someone else's) with a link leading out of it, a truncated or corrupt index.json, or one
    whose names lead outside the folder or whose counts its files cannot hold (slm/core/shard_index.py), a shard of
    another size (and sha1, if `hashes`) than index.json says, and, if `complete` (a folder without a remote to fill
    it), a shard whose file Streaming needs is not there (a compressed shard's compressed file: without it, Streaming
    deletes the plain one and looks for a remote), before anything reads it; only the files present are checked (a
    remote's cache fills in as it goes)."""
    checked_folder(folder, "shard folder")
    index = folder / "index.json"
    try:
        shards = checked_index(read_json(index, "shard index"), folder, f"shard index {index}")
    except FileNotFoundError:
        raise SlmError(f"{folder} holds no MDS shards (no index.json): make them with `slm tokenize`") from None
    if not sum(shard["samples"] for shard in shards):
        raise SlmError(f"{folder} holds no samples: re-run `slm tokenize` on a non-empty corpus")
    for shard in shards:
        needed = (shard.get("zip_data") or shard["raw_data"])["basename"]
        if complete and not (folder / needed).is_file():
            raise SlmError(f"{folder} lacks the shard file {needed} its index.json names: the folder is incomplete; "
                           "copy it whole, or re-run `slm tokenize`")
        for part in (shard.get("zip_data"), shard.get("raw_data")):
            path = folder / part["basename"] if part else None
            if path is None or not path.exists():
                continue
            expected = mapping(part.get("hashes") or {}, f"{index}: hashes").get("sha1") if hashes else None
            if expected and hashlib.sha1(path.read_bytes()).hexdigest() != expected:
                raise SlmError(f"shard {path} does not match its sha1 in index.json: it is corrupt; re-run "
                               "`slm tokenize`")


def check_data_fits(metas: list[tuple[str | Path, dict]], tokenizer: PreTrainedTokenizerFast, tokenizer_name: str,
                    vocab_size: int, max_positions: int | None) -> None:
    """Refuse data a model cannot read, naming the folder (`split_metadatas`' label) and both values: the one rule of
    data and model, for training and every study command. Every folder was tokenized with `tokenizer` (named
    `tokenizer_name`; content hashes compared), its ids fit the model's `vocab_size`, its samples its
    `max_positions`, and all folders share one seq_len."""
    for label, meta in metas:
        if not tokenizer_matches(tokenizer, meta["tokenizer"]):
            raise SlmError(f"{label} was tokenized with {meta['tokenizer']['name']}, not with {tokenizer_name} "
                           f"(content hashes differ){mismatch_hint(tokenizer, meta['tokenizer'])}")
    for label, meta in metas:
        data_vocab = meta["tokenizer"]["vocab_size"]
        if data_vocab > vocab_size:
            raise SlmError(f"{label} was tokenized with a {data_vocab}-token tokenizer but model.vocab_size is "
                           f"{vocab_size}: set model.vocab_size >= {data_vocab} or re-tokenize")
        if max_positions is not None and meta["seq_len"] > max_positions:
            raise SlmError(f"{label} has seq_len {meta['seq_len']} but the model has "
                           f"max_position_embeddings {max_positions}: raise model.max_position_embeddings or "
                           f"re-tokenize with --seq-len {max_positions}")
    (first, first_meta), *others = metas
    for label, meta in others:
        if meta["seq_len"] != first_meta["seq_len"]:
            raise SlmError(f"{first} has seq_len {first_meta['seq_len']} but {label} has {meta['seq_len']}: "
                           "train, eval and every stream need one seq_len")


def build_dataset(split: DataSplit, data: DataConfig, batch_size: int, train: bool) -> MappedShards:
    """Build the Streaming dataset of one split; `batch_size` is per process.

    A split of streams is one Streaming dataset over all of them: each epoch draws each stream's share (its
    proportion or repeat; Streaming's `Stream`), and the shuffle mixes the streams' samples within batches. The
    draw changes every training epoch; an eval split draws the same samples at every evaluation ("fixed").
    """
    for attempt in range(SHM_ATTEMPTS):
        try:
            where: dict[str, Any] = {"local": split.local, "remote": split.remote}
            if split.streams:  # new Streams each attempt: the dataset writes the weights it derives into them
                where = {"streams": [Stream(local=s.local, remote=s.remote, proportion=s.proportion, repeat=s.repeat)
                                     for s in split.streams.values()]}
            dataset = MappedShards(**where, batch_size=batch_size, shuffle=train and data.shuffle,
                                   shuffle_seed=data.shuffle_seed, shuffle_algo=data.shuffle_algo,
                                   num_canonical_nodes=data.num_canonical_nodes,
                                   sampling_method="balanced" if train else "fixed")
            break
        except FileExistsError:
            # Streaming gives each run on a node the first free shared-memory prefix; two runs starting at the
            # same moment (array tasks on one node) can pick the same one, and the second finds it taken.
            # Trying again picks the next free one.
            if attempt == SHM_ATTEMPTS - 1:
                raise
            time.sleep(_jitter.uniform(0.2, 2.0))
        except (FileNotFoundError, ValueError) as e:
            folders = ", ".join(str(s.local) for s in split.streams.values()) if split.streams else split.local
            raise SlmError(f"cannot open the MDS shards at {folders}: {str(e).splitlines()[0]}") from e
    return dataset


def build_dataloader(split: DataSplit, data: DataConfig, batch_size: int, train: bool) -> DataSpec:
    """Build a DataSpec over one split (`build_dataset`); `batch_size` is per process, the last short batch dropped."""
    dataset = build_dataset(split, data, batch_size, train)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=data.num_workers,
                        drop_last=train, persistent_workers=data.num_workers > 0)
    return DataSpec(loader, get_num_tokens_in_batch=lambda b: b["input_ids"].numel())
