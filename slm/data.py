"""Training data: Streaming's `StreamingDataset` over the MDS folders `slm tokenize` writes (one per split, or
a mixture: `data.{train,eval}.streams`, each a Streaming `Stream`).

Streaming does the shuffling (seeded, independent of the init seed), the split of each
global batch across processes, and exact mid-epoch resumption (Composer saves its state
in every checkpoint), so nothing is spun through on resume. `MappedShards` keeps all of
that and only reads each sample's bytes faster.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.core import DataSpec
from composer.utils import dist
from streaming import Stream, StreamingDataset
from streaming.base.format.mds.encodings import _get_coder
from streaming.base.format.mds.reader import MDSReader
from torch.utils.data import DataLoader

from slm.config import DataConfig, DataSplit, StreamConfig
from slm.errors import SlmError
from slm.shards import read_metadata

SHM_ATTEMPTS = 5
_jitter = random.Random()  # its own state: the global one is the training's
# MappedShards drives these Streaming internals (_resume_incr_epoch, _get_work, the worlds, the shard
# readers' fields, _get_coder); with another version of mosaicml-streaming it reads samples the stock way.
STREAMING_WRITTEN_FOR = "0.13.0"
_STREAMING_MATCHES = metadata.version("mosaicml-streaming") == STREAMING_WRITTEN_FOR


class MappedShards(StreamingDataset):
    """Streaming's `StreamingDataset`, reading each sample as a slice of its memory-mapped shard.

    Streaming's iteration opens the shard file again for every sample and runs two helper threads
    that take a file lock per sample (~400 us a sample). Here everything that decides which sample
    comes next stays Streaming's: the epoch's shuffled, partitioned sample ids (`_get_work`), the
    epoch counter and mid-epoch resumption (`state_dict` / `load_state_dict`), ranks and workers.
    Only the read changes: each decompressed shard is mapped once per epoch and a sample is its
    byte range, decoded by Streaming's own coders, so the samples and their order are the stock
    reader's, bit for bit (tests/test_data.py). Shards are still prepared (downloaded, decompressed) by
    Streaming's `prepare_shard`; with a remote, a thread prepares them in order of first use ahead
    of the reads. Anything else (another Streaming version, a non-MDS shard) reads the stock way.
    """

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not _STREAMING_MATCHES or not all(isinstance(shard, MDSReader) for shard in self.shards):
            yield from super().__iter__()
            return
        # What StreamingDataset.__iter__ does before it starts its threads: end the previous epoch's
        # iteration, see which worker this is, take the next epoch (or the resumed one) and its work.
        if hasattr(self, "_iterator"):
            self._iterator.exit()
        self._unique_worker_world = self._unique_rank_world.detect_workers()
        self._parallel_worker_world = self._parallel_rank_world.detect_workers()
        epoch, sample_in_epoch = self._resume_incr_epoch()
        sample_ids = self._get_work(epoch, sample_in_epoch)
        sample_ids = sample_ids[sample_ids >= 0]  # -1: padding of an uneven partition, skipped as Streaming does
        shard_ids = np.searchsorted(self.sample_offset_per_shard, sample_ids, side="right") - 1
        in_shard = sample_ids - self.sample_offset_per_shard[shard_ids]

        done = threading.Event()
        if any(stream.remote for stream in self.streams):
            first_use = np.unique(shard_ids, return_index=True)
            order = first_use[0][np.argsort(first_use[1])].tolist()
            threading.Thread(target=self._prepare_ahead, args=(order, done), daemon=True).start()
        readers: dict[int, Callable[[int], dict[str, Any]]] = {}
        try:
            for shard_id, index in zip(shard_ids.tolist(), in_shard.tolist(), strict=True):
                read = readers.get(shard_id)
                if read is None:
                    read = readers[shard_id] = self._map_shard(shard_id)
                yield read(index)
        finally:
            done.set()

    def _prepare_ahead(self, order: list[int], done: threading.Event) -> None:
        for shard_id in order:
            if done.is_set():
                return
            self.prepare_shard(shard_id, blocking=False)

    def _map_shard(self, shard_id: int) -> Callable[[int], dict[str, Any]]:
        """A reader of one shard's samples by index in the shard, over the shard's decompressed file mapped once.

        MDS layout: uint32 sample count, uint32 offsets of the n + 1 sample boundaries, the samples. When every
        column has a fixed size (slm's `tokens` does), the columns' coders are made once here instead of
        from their encoding strings for every sample, as `decode_sample` does.
        """
        shard = self.shards[shard_id]
        raw = os.path.join(shard.dirname, shard.split or "", shard.raw_data.basename)
        self._prepare(shard_id, raw)
        with open(raw, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        offsets = np.frombuffer(data, np.uint32, count=shard.samples + 1, offset=4).tolist()
        if not all(shard.column_sizes):
            return lambda i: shard.decode_sample(data[offsets[i]:offsets[i + 1]])
        bounds = np.cumsum([0, *shard.column_sizes]).tolist()
        columns = [(name, _get_coder(encoding).decode, start, end) for name, encoding, start, end
                   in zip(shard.column_names, shard.column_encodings, bounds[:-1], bounds[1:], strict=True)]

        def read(i: int) -> dict[str, Any]:
            sample = data[offsets[i]:offsets[i + 1]]
            return {name: decode(sample[start:end]) for name, decode, start, end in columns}

        return read

    def _prepare(self, shard_id: int, raw: str) -> None:
        """Streaming's prepare_shard, under an exclusive lock on the compressed file while it is decompressed here.

        Streaming decompresses into `RAW.tmp` and renames it; two runs (own shared memory each)
        decompressing one shard of a folder at once clash on that file, so they take turns.
        """
        if os.path.isfile(raw):
            return
        zip_data = self.shards[shard_id].zip_data
        try:
            zipped = open(os.path.join(os.path.dirname(raw), zip_data.basename), "rb") if zip_data else None
        except FileNotFoundError:  # not here yet: a download, under Streaming's own locking
            zipped = None
        if zipped is None:
            self.prepare_shard(shard_id)
            return
        with zipped:
            fcntl.flock(zipped, fcntl.LOCK_EX)
            if not os.path.isfile(raw):
                self.prepare_shard(shard_id)


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    return {"input_ids": tokens, "labels": tokens.clone()}


def sources(split: DataSplit, name: str) -> list[tuple[str, StreamConfig]]:
    """(label, folder) of each MDS folder of the split `data.NAME`: the split's own (label `data.NAME`), or each of
    its streams (label `data.NAME.streams.STREAM`), in config order."""
    if split.streams:
        return [(f"data.{name}.streams.{stream}", folder) for stream, folder in split.streams.items()]
    return [(f"data.{name}", StreamConfig(local=split.local, remote=split.remote))]


def describe_split(split: dict) -> str:
    """A split of a run's config, as run.json keeps it, in a line: its folder, or `web (0.7): PATH, code (0.3): PATH`
    (a stream's remote when it has one)."""
    def weight(stream: dict) -> str:
        if stream.get("proportion") is not None:
            return f" ({stream['proportion']:g})"
        return f" (repeat {stream['repeat']:g})" if stream.get("repeat") is not None else ""

    streams = split.get("streams") or {}
    return ", ".join(f"{name}{weight(s)}: {s.get('remote') or s.get('local')}" for name, s in streams.items()) or \
        str(split.get("remote") or split.get("local"))


def split_metadatas(split: DataSplit, name: str) -> list[tuple[str, dict]]:
    """(label, slm-dataset.json) of each MDS folder of the split (`sources`), each folder's shards checked."""
    return [(label, folder_metadata(folder, label)) for label, folder in sources(split, name)]


def folder_metadata(folder: StreamConfig, label: str) -> dict:
    """The folder's `slm-dataset.json`, fetched from its remote when only the remote has it; its shards checked."""
    local = Path(folder.local)
    if folder.remote and not (local / "slm-dataset.json").exists():
        from streaming.base.storage import CloudDownloader

        local.mkdir(parents=True, exist_ok=True)
        try:
            CloudDownloader.direct_download(f"{folder.remote.rstrip('/')}/slm-dataset.json",
                                            str(local / "slm-dataset.json"), 60)
        except Exception as e:
            raise SlmError(f"cannot fetch slm-dataset.json of {label} from {folder.remote}: {e}") from e
    elif not (local / "index.json").exists():
        raise SlmError(f"{label}.local = {local} holds no MDS shards (no index.json): make them with "
                       f"`slm tokenize`, or set {label}.local to the right folder")
    if (local / "index.json").exists():
        check_shards(local, hashes=dist.get_local_rank() == 0)  # one reader per node hashes; all check sizes
    return read_metadata(local)


def check_shards(folder: Path, hashes: bool = True) -> None:
    """Refuse a truncated or corrupt index.json or shard (size, and sha1 if `hashes`, against index.json) before
    training starts on it; only the files present are checked (a remote's cache fills in as it goes)."""
    index = folder / "index.json"
    try:
        shards = json.loads(index.read_text())["shards"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SlmError(f"{index} is truncated or corrupt ({type(e).__name__}: {e}): re-run `slm tokenize`") from e
    if not sum(shard.get("samples", 0) for shard in shards):
        raise SlmError(f"{folder} holds no samples: re-run `slm tokenize` on a non-empty corpus")
    for shard in shards:
        for part in (shard.get("zip_data"), shard.get("raw_data")):
            path = folder / part["basename"] if part else None
            if path is None or not path.exists():
                continue
            size = path.stat().st_size
            if size != part["bytes"]:
                raise SlmError(f"shard {path} is {size} bytes but index.json says {part['bytes']}: it is truncated "
                               "or corrupt; re-run `slm tokenize`")
            expected = part.get("hashes", {}).get("sha1") if hashes else None
            if expected and hashlib.sha1(path.read_bytes()).hexdigest() != expected:
                raise SlmError(f"shard {path} does not match its sha1 in index.json: it is corrupt; re-run "
                               "`slm tokenize`")


def check_compatible(metas: list[tuple[str | Path, dict]], vocab_size: int, max_positions: int | None) -> None:
    """Refuse data the model cannot read, naming the folder (`split_metadatas`' label) and both values; all
    folders must share one seq_len. (The tokenizer is checked against each folder by the caller: shards of an
    older slm record another kind of hash for the same tokenizer.)"""
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
    """The Streaming dataset of one split; `batch_size` is per process.

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
    """A DataSpec over one split (`build_dataset`); `batch_size` is per process, the last short batch dropped."""
    dataset = build_dataset(split, data, batch_size, train)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=data.num_workers,
                        drop_last=train, persistent_workers=data.num_workers > 0)
    return DataSpec(loader, get_num_tokens_in_batch=lambda b: b["input_ids"].numel())
