"""Drives Streaming's private internals (`_resume_incr_epoch`, `_get_work`, the rank and worker worlds, the MDS
shard readers' fields, `_get_coder`) to read each training sample as a slice of its memory-mapped shard.

Written for mosaicml-streaming 0.13.0 (slm/core/workarounds.py, `WRITTEN_FOR`); on another version, or a shard that is
not MDS, it reads samples the stock way (tests/data/test_mapped_shards.py checks both against Streaming's own reader).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from streaming import StreamingDataset
from streaming.base.format.mds.encodings import _get_coder
from streaming.base.format.mds.reader import MDSReader

from slm.core.workarounds import written_for


class MappedShards(StreamingDataset):
    """Streaming's `StreamingDataset`, reading each sample as a slice of its memory-mapped shard.

    Streaming's iteration opens the shard file again for every sample and runs two helper threads
    that take a file lock per sample (~400 us a sample). Here everything that decides which sample
    comes next stays Streaming's: the epoch's shuffled, partitioned sample ids (`_get_work`), the
    epoch counter and mid-epoch resumption (`state_dict` / `load_state_dict`), ranks and workers.
    Only the read changes: each decompressed shard is mapped once per epoch and a sample is its
    byte range, decoded by Streaming's own coders, so the samples and their order are the stock
    reader's, bit for bit (tests/data/test_mapped_shards.py). Shards are still prepared (downloaded, decompressed) by
    Streaming's `prepare_shard`; with a remote, a thread prepares them in order of first use ahead
    of the reads. Anything else (another Streaming version, a non-MDS shard) reads the stock way.
    """

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not written_for("mosaicml-streaming") or not all(isinstance(shard, MDSReader) for shard in self.shards):
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
        """Prepare (download, decompress) the shards in `order`, the epoch's order of first use, until `done` is set."""
        for shard_id in order:
            if done.is_set():
                return
            self.prepare_shard(shard_id, blocking=False)

    def _map_shard(self, shard_id: int) -> Callable[[int], dict[str, Any]]:
        """Make a reader of one shard's samples by index in the shard, over the shard's decompressed file mapped once.

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
        """Run Streaming's prepare_shard, under an exclusive lock on the compressed file while it is decompressed here.

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
