"""The fast read path (`MappedShards`) against Streaming's stock reader: same samples, same order, bitwise,
over shuffled epochs, a mid-epoch resume, data-loader workers, two processes and a remote."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming import MDSWriter, StreamingDataset
from torch.utils.data import DataLoader

from slm.core.streaming_workarounds import streaming_datasets
from slm.data.loading import collate
from slm.data.mapped_shards import MappedShards

BATCH = 8


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,003 random samples of 16 tokens in zstd shards of ~2 KiB (about 70 shards; the last one short)."""
    out = tmp_path_factory.mktemp("many-shards") / "mds"
    rng = np.random.default_rng(0)
    with MDSWriter(out=str(out), columns={"tokens": "ndarray:uint16:16"}, compression="zstd", size_limit=2048) as w:
        for _ in range(1003):
            w.write({"tokens": rng.integers(0, 60000, 16, dtype=np.uint16)})
    return out


def read(cls: type[StreamingDataset], local: Path, workers: int = 0, remote: Path | None = None
         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Epoch 1 whole, then epoch 2 stopped after 5 batches, saved, and resumed in a new dataset: the batches
    of epoch 1 and of epoch 2 (before and after the resume)."""

    def dataset() -> StreamingDataset:
        return cls(local=str(local), remote=str(remote) if remote else None, batch_size=BATCH, shuffle=True,
                   shuffle_seed=7, num_canonical_nodes=1)

    def loader(ds: StreamingDataset) -> DataLoader:
        return DataLoader(ds, batch_size=BATCH, collate_fn=collate, num_workers=workers, drop_last=True)

    with streaming_datasets():  # prefixes registered as slm's readers do: a session beside this one reads too
        ds = dataset()
        first = [b["input_ids"] for b in loader(ds)]
        if cls is MappedShards and not workers:  # its own read, not the stock fallback (which leaves an _iterator)
            assert not hasattr(ds, "_iterator")
        batches = iter(loader(ds))
        second = [next(batches)["input_ids"] for _ in range(5)]
        state = ds.state_dict(num_samples=5 * BATCH, from_beginning=False)
        del batches, ds
        gc.collect()  # Streaming frees its shared memory when the dataset goes
        resumed = dataset()
        resumed.load_state_dict(state)
        second += [b["input_ids"] for b in loader(resumed)]
        return first, second


@pytest.mark.parametrize("workers", [0, 2])
def test_same_samples_in_the_same_order_as_the_stock_reader(many_shards: Path, workers: int):
    fast_first, fast_second = read(MappedShards, many_shards, workers)
    stock_first, stock_second = read(StreamingDataset, many_shards, workers)
    assert len(fast_first) == len(stock_first) == 1003 // BATCH
    assert len(fast_second) == len(stock_second) == 1003 // BATCH
    for fast, stock in ((fast_first, stock_first), (fast_second, stock_second)):
        assert all(torch.equal(a, b) for a, b in zip(fast, stock, strict=True))
    # A real shuffle: every sample at most once per epoch, and the two epochs in different orders.
    epoch = torch.cat(fast_first)
    assert len(torch.unique(epoch, dim=0)) == len(epoch)
    assert not torch.equal(epoch, torch.cat(fast_second))


def test_shards_fetched_from_a_remote(many_shards: Path, tmp_path: Path):
    """A remote (a folder standing in for hf:// or s3://): shards are downloaded and decompressed as they are
    first needed, and read the same as locally."""
    fast = read(MappedShards, tmp_path / "cache-fast", remote=many_shards)
    stock = read(StreamingDataset, tmp_path / "cache-stock", remote=many_shards)
    for a, b in zip(fast[0] + fast[1], stock[0] + stock[1], strict=True):
        assert torch.equal(a, b)
    assert list((tmp_path / "cache-fast").glob("shard.*.mds"))


ORDER_OF_RANK = """
import json, sys, torch
from streaming import StreamingDataset
from torch.utils.data import DataLoader
from slm.data.loading import collate
from slm.data.mapped_shards import MappedShards
out = {}
for cls in (MappedShards, StreamingDataset):
    ds = cls(local=sys.argv[1], batch_size=4, shuffle=True, shuffle_seed=3, num_canonical_nodes=2)
    out[cls.__name__] = torch.cat([b["input_ids"] for b in DataLoader(ds, batch_size=4, collate_fn=collate)]).tolist()
    del ds
print(json.dumps(out))
"""


def test_two_processes_read_what_the_stock_reader_gives_each(many_shards: Path, tmp_path: Path):
    """Two ranks of one node (what `composer -n 2` starts): each rank's samples are the stock reader's."""
    local = tmp_path / "mds"
    local.symlink_to(many_shards)  # its own path: the other tests' shared memory names the first
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29517"}
    procs = [subprocess.Popen([sys.executable, "-c", ORDER_OF_RANK, str(local)], stdout=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in (0, 1)]
    orders = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for order in orders:
        assert order["MappedShards"] == order["StreamingDataset"]
    assert not {tuple(s) for s in orders[0]["MappedShards"]} & {tuple(s) for s in orders[1]["MappedShards"]}
