"""The samples of an MDS split as the study commands read them (`slm eval`, `slm logprobs`, `slm dynamics`): in
order, by index, read once for every checkpoint where they fit in memory; and the check that a model can read them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from streaming import StreamingDataset
from transformers import PreTrainedTokenizerFast

from slm.core import streaming_workarounds
from slm.data.loading import check_data_fits, check_shards, collate
from slm.data.shards import read_metadata
from slm.training.model import context_length

if TYPE_CHECKING:
    from slm.analysis.trained_models import Loaded

READ_ONCE = 2**30  # bytes: a split's samples up to this size are read once, for every checkpoint


class SplitSamples:
    """The first `count` samples of the split at `data`, in order, as token-id batches: read from the shards once
    into memory where they take at most READ_ONCE bytes (every checkpoint then reads them from there), else read
    from the shards batch by batch."""

    def __init__(self, data: Path, meta: dict, dataset: StreamingDataset, count: int):
        self.data, self.meta, self.dataset, self.count = data, meta, dataset, count
        self.memory = self._read(0, count) if count * meta["seq_len"] * 8 <= READ_ONCE else None

    def _read(self, start: int, end: int) -> torch.Tensor:
        """Read samples `start` to `end` (excluded) from the shards."""
        return collate([self.dataset[i] for i in range(start, end)])["input_ids"]

    def batch(self, start: int, end: int) -> torch.Tensor:
        """Return samples `start` to `end` (excluded) as a (samples, seq_len) tensor of token ids."""
        return self.memory[start:end] if self.memory is not None else self._read(start, end)

    def batches(self, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (index of the first sample, batch) over the samples, `batch_size` at a time."""
        for start in range(0, self.count, batch_size):
            yield start, self.batch(start, min(start + batch_size, self.count))


@contextmanager
def split_samples(data: Path, max_samples: int | None = None) -> Iterator[SplitSamples]:
    """Open the first `max_samples` samples (all, if None) of the shards at `data`, checked, for one checkpoint or
    several."""
    meta = read_metadata(data)
    check_shards(data)
    with _alone(), streaming_workarounds.streaming_datasets():
        dataset = StreamingDataset(local=str(data), shuffle=False)  # read by index, in order
        yield SplitSamples(data, meta, dataset, min(dataset.num_samples, max_samples or dataset.num_samples))


def check_data(loaded: Loaded, split: SplitSamples) -> PreTrainedTokenizerFast:
    """Refuse a split the loaded checkpoint's model cannot read (ids past its vocabulary, samples past its positions)
    or tokenized with another tokenizer than the model's; return the model's tokenizer."""
    check_data_fits([(split.data, split.meta)], loaded.tokenizer, f"the model's tokenizer {loaded.tokenizer_name}",
                    loaded.model.config.vocab_size, context_length(loaded.model.config))
    return loaded.tokenizer


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
