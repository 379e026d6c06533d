"""Training data: Streaming's `StreamingDataset` over the MDS folders `slm tokenize` writes.

Streaming does the shuffling (seeded, independent of the init seed), the split of each
global batch across processes, and exact mid-epoch resumption (Composer saves its state
in every checkpoint), so nothing is spun through on resume.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from composer.core import DataSpec
from composer.utils import dist
from streaming import StreamingDataset
from torch.utils.data import DataLoader

from slm.config import DataConfig, DataSplit
from slm.errors import SlmError
from slm.shards import read_metadata

SHM_ATTEMPTS = 5
_jitter = random.Random()  # its own state: the global one is the training's


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
    """Refuse data the model cannot read, naming both values."""
    for name, meta in (("train", train_meta), ("eval", eval_meta)):
        data_vocab = meta["tokenizer"]["vocab_size"]
        if data_vocab > vocab_size:
            raise SlmError(f"data.{name} was tokenized with a {data_vocab}-token tokenizer but model.vocab_size is "
                           f"{vocab_size}: set model.vocab_size >= {data_vocab} or re-tokenize")
        if max_positions is not None and meta["seq_len"] > max_positions:
            raise SlmError(f"data.{name} has seq_len {meta['seq_len']} but the model has "
                           f"max_position_embeddings {max_positions}: raise model.max_position_embeddings or "
                           f"re-tokenize with --seq-len {max_positions}")
    if train_meta["tokenizer"]["content_hash"] != eval_meta["tokenizer"]["content_hash"]:
        raise SlmError(f"data.train and data.eval were tokenized with different tokenizers "
                       f"({train_meta['tokenizer']['name']} vs {eval_meta['tokenizer']['name']})")
    if train_meta["seq_len"] != eval_meta["seq_len"]:
        raise SlmError(f"data.train has seq_len {train_meta['seq_len']} but data.eval has {eval_meta['seq_len']}")


def build_dataloader(split: DataSplit, data: DataConfig, batch_size: int, train: bool) -> DataSpec:
    """A DataSpec over one split; `batch_size` is per process."""
    for attempt in range(SHM_ATTEMPTS):
        try:
            dataset = StreamingDataset(local=split.local, remote=split.remote, batch_size=batch_size,
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
