"""Training data: Streaming's `StreamingDataset` over the MDS folders `slm tokenize` writes.

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
from streaming import StreamingDataset
from streaming.base.format.mds.encodings import _get_coder
from streaming.base.format.mds.reader import MDSReader
from torch.utils.data import DataLoader

from slm.config import DataConfig, DataSplit
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


def split_metadata(split: DataSplit, name: str) -> dict:
    """The split's `slm-dataset.json`, fetched from its remote when only the remote has it."""
    local = Path(split.local)
    if split.remote and not (local / "slm-dataset.json").exists():
        from streaming.base.storage import CloudDownloader

        local.mkdir(parents=True, exist_ok=True)
        try:
            CloudDownloader.direct_download(f"{split.remote.rstrip('/')}/slm-dataset.json",
                                            str(local / "slm-dataset.json"), 60)
        except Exception as e:
            raise SlmError(f"cannot fetch slm-dataset.json of data.{name} from {split.remote}: {e}") from e
    elif not (local / "index.json").exists():
        raise SlmError(f"data.{name}.local = {local} holds no MDS shards (no index.json): make them with "
                       f"`slm tokenize`, or set data.{name}.local to the right folder")
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


def check_compatible(train_meta: dict, eval_meta: dict, vocab_size: int, max_positions: int | None) -> None:
    """Refuse data the model cannot read, naming both values (the tokenizer is checked against each split by the
    caller: shards of an older slm record another kind of hash for the same tokenizer)."""
    for name, meta in (("train", train_meta), ("eval", eval_meta)):
        data_vocab = meta["tokenizer"]["vocab_size"]
        if data_vocab > vocab_size:
            raise SlmError(f"data.{name} was tokenized with a {data_vocab}-token tokenizer but model.vocab_size is "
                           f"{vocab_size}: set model.vocab_size >= {data_vocab} or re-tokenize")
        if max_positions is not None and meta["seq_len"] > max_positions:
            raise SlmError(f"data.{name} has seq_len {meta['seq_len']} but the model has "
                           f"max_position_embeddings {max_positions}: raise model.max_position_embeddings or "
                           f"re-tokenize with --seq-len {max_positions}")
    if train_meta["seq_len"] != eval_meta["seq_len"]:
        raise SlmError(f"data.train has seq_len {train_meta['seq_len']} but data.eval has {eval_meta['seq_len']}")


def build_dataloader(split: DataSplit, data: DataConfig, batch_size: int, train: bool) -> DataSpec:
    """A DataSpec over one split; `batch_size` is per process."""
    for attempt in range(SHM_ATTEMPTS):
        try:
            dataset = MappedShards(local=split.local, remote=split.remote, batch_size=batch_size,
                                   shuffle=train and data.shuffle, shuffle_seed=data.shuffle_seed,
                                   shuffle_algo=data.shuffle_algo, num_canonical_nodes=data.num_canonical_nodes)
            break
        except FileExistsError:
            # Streaming gives each run on a node the first free shared-memory prefix; two runs starting at the
            # same moment (array tasks on one node) can pick the same one, and the second finds it taken.
            # Trying again picks the next free one.
            if attempt == SHM_ATTEMPTS - 1:
                raise
            time.sleep(_jitter.uniform(0.2, 2.0))
        except (FileNotFoundError, ValueError) as e:
            raise SlmError(f"cannot open the MDS shards at {split.local}: {str(e).splitlines()[0]}") from e
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=data.num_workers,
                        drop_last=train, persistent_workers=data.num_workers > 0)
    return DataSpec(loader, get_num_tokens_in_batch=lambda b: b["input_ids"].numel())
