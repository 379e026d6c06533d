"""The data path: slm's training loader (`MappedShards`) against Streaming's stock reader and the raw-memmap limit.

Shards made with `slm tokenize` from a generated corpus (128-token samples, zstd), read as training reads
them: shuffled, in batches through a torch DataLoader with slm's collate, one whole epoch per figure,
after an untimed epoch that decompresses the shards. Three readers of the same shards, in one run:
  stock      streaming.StreamingDataset (opens the shard file for every sample; helper threads)
  slm        slm.data.mapped_shards.MappedShards: the same sample ids, each sample sliced from its memory-mapped shard
  raw mmap   the limit: each sample a row of its memory-mapped shard (numpy), stacked; no Streaming,
             no decoding, no DataLoader. The same order as slm's.
Each with 0 worker processes and with --workers. Goal: slm >= 20x stock, per process (0 workers).

    python bench/loader.py [--docs 20000] [--seq-len 128] [--batch 8] [--workers 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from streaming import StreamingDataset
from torch.utils.data import DataLoader

from slm.data.loading import collate
from slm.data.mapped_shards import MappedShards

from benchlib import machine, make_data


def epoch_rate(cls: type[StreamingDataset], local: Path, batch: int, workers: int) -> tuple[float, list[int]]:
    """Samples/s over one shuffled epoch (after an untimed one), and the sample ids of the timed epoch's order."""
    dataset = cls(local=str(local), batch_size=batch, shuffle=True, shuffle_seed=1337, num_canonical_nodes=1)
    loader = DataLoader(dataset, batch_size=batch, collate_fn=collate, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    for _ in loader:  # decompresses what is not yet, starts the workers
        pass
    start = time.perf_counter()
    samples = sum(len(b["input_ids"]) for b in loader)
    seconds = time.perf_counter() - start
    order = [i for i in dataset._get_work(1, 0).tolist() if i >= 0] if workers == 0 else []  # timed epoch (1)
    del loader, dataset
    gc.collect()  # Streaming frees its shared memory when the dataset goes
    return samples / seconds, order


def raw_mmap_rate(local: Path, order: list[int], batch: int) -> float:
    """Samples/s of stacking rows of the memory-mapped decompressed shards in `order`: the hardware's side."""
    index = json.loads((local / "index.json").read_text())["shards"]
    shards, first = [], [0]
    for shard in index:
        data = np.memmap(local / shard["raw_data"]["basename"], dtype=np.uint8, mode="r")
        offsets = np.frombuffer(data, np.uint32, count=shard["samples"] + 1, offset=4)
        dtype, seq_len = np.dtype(shard["column_encodings"][0].split(":")[1]), int(shard["column_encodings"][0]
                                                                                    .split(":")[2])
        shards.append(np.ndarray((shard["samples"], seq_len), dtype, data, offset=int(offsets[0])))
        first.append(first[-1] + shard["samples"])
    where = np.searchsorted(first, order, side="right") - 1
    rows = list(zip(where.tolist(), (np.array(order) - np.array(first)[where]).tolist(), strict=True))
    start = time.perf_counter()
    for i in range(0, len(rows) - batch + 1, batch):
        torch.from_numpy(np.stack([shards[s][j] for s, j in rows[i:i + batch]]).astype(np.int64))
    return (len(rows) // batch * batch) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20000, help="generated stories (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the second row of each reader")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="slm-bench-loader-"))
    try:
        make_data(root, args.docs, 4096, args.seq_len)
        local = root / "mds" / "train"
        samples = sum(s["samples"] for s in json.loads((local / "index.json").read_text())["shards"])
        print(f"machine: {machine()}\n{samples:,} samples of {args.seq_len} tokens, batch {args.batch}, one shuffled "
              "epoch per figure", flush=True)
        rates = {}
        for workers in (0, args.workers):
            rates[f"stock/{workers}"], _ = epoch_rate(StreamingDataset, local, args.batch, workers)
            rates[f"slm/{workers}"], order = epoch_rate(MappedShards, local, args.batch, workers)
            if workers == 0:
                rates["raw/0"] = raw_mmap_rate(local, order, args.batch)
        for key, rate in rates.items():
            reader, workers = key.split("/")
            print(f"  {reader:6s} {workers} workers {rate:12,.0f} samples/s   vs stock with 0 workers "
                  f"{rate / rates['stock/0']:7.1f}x", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"samples": samples, "seq_len": args.seq_len, "batch": args.batch,
                                         "workers": args.workers, "docs": args.docs, "samples_per_s": rates},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
