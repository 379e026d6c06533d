"""`slm batches`: the exact samples every rank trains on at each step, from the config and the shards alone.

Streaming decides the order: per epoch, `generate_work` partitions the (shuffled, resampled) sample
space into nodes x ranks x workers x batches, and each loader worker yields its part with the -1
padding skipped (as MappedShards does), cut into batches of the per-rank size, the short one
dropped; PyTorch's loader takes the workers' batches in turn. Here the same Streaming calls (some private,
so bound to the version in slm/core/workarounds.py's WRITTEN_FOR) run for any world size without training, so
step s of rank r is the batch that rank's loader yields s-th.
A killed and resumed run trains on the same batches (resumption is exact: tests/analysis/test_batches.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from composer.core import Time, TimeUnit
from streaming.base.batching import generate_work
from streaming.base.world import World

from slm.core.config import TrainConfig, load_config, load_saved_config
from slm.core.errors import SlmError, say
from slm.core.run_folder import checked_run_folder, read_run_record
from slm.core.workarounds import require
from slm.data.loading import build_dataset, check_shards, split_streams
from slm.data.shards import Documents, read_documents


@dataclass
class Processes:
    """The processes of a run, as Streaming partitions for them."""

    nodes: int = 1
    ranks_per_node: int = 1
    workers_per_rank: int = 1

    @property
    def ranks(self) -> int:
        """The number of training processes: nodes times ranks per node."""
        return self.nodes * self.ranks_per_node


class Batches:
    """The training batches of one config (its `data.train`), for one world of processes."""

    def __init__(self, cfg: TrainConfig, world: Processes, folders: dict[str, Path] | None = None):
        """`folders`: each stream's folder where `cfg` reads it as a remote (`read_only`), else its own local."""
        require("mosaicml-streaming", "slm batches (it reproduces Streaming's sample order)")
        if cfg.global_batch_size % world.ranks:
            raise SlmError(f"global_batch_size {cfg.global_batch_size} does not split across {world.ranks} "
                           "processes: give a --world-size that divides it")
        self.cfg, self.world = cfg, world
        self.per_rank = cfg.global_batch_size // world.ranks
        self.dataset = build_dataset(cfg.data.train, cfg.data, self.per_rank, train=True)
        self.streams = [label.rsplit(".", 1)[-1] if cfg.data.train.streams else "train"
                        for label, _ in split_streams(cfg.data.train, "train")]
        self.steps_per_epoch = len(self._epoch(0)[0])
        self._documents: dict[str, Documents | None] = {}
        self.folders = folders or {}

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        """Return, per rank, the epoch's batches: an array (steps, per_rank) of global sample ids."""
        w = self.world
        world = World(w.nodes, w.ranks_per_node, w.workers_per_rank, 0)
        self.dataset._set_shuffle_block_size(world)  # what the dataset's first iteration does (its default)
        work = generate_work(self.dataset.batching_method, self.dataset, world, epoch, 0)
        ranks = []
        for rank in range(w.ranks):
            node, of_node = divmod(rank, w.ranks_per_node)
            per_worker = []
            for worker in range(w.workers_per_rank):
                ids = work[node, of_node, worker].reshape(-1)
                ids = ids[ids >= 0]
                whole = len(ids) // self.per_rank * self.per_rank
                per_worker.append(list(ids[:whole].reshape(-1, self.per_rank)))
            ranks.append(np.array(_in_turn(per_worker)).reshape(-1, self.per_rank))
        return ranks

    def max_steps(self) -> int | None:
        """Return the steps max_duration trains (None when it is in samples or tokens and no step count is implied)."""
        duration = Time.from_timestring(self.cfg.max_duration)
        if duration.unit == TimeUnit.BATCH:
            return int(duration.value)
        if duration.unit == TimeUnit.EPOCH:
            return int(duration.value) * self.steps_per_epoch
        if duration.unit == TimeUnit.SAMPLE:
            return -(-int(duration.value) // self.cfg.global_batch_size)
        return None

    def rows(self, first: int, last: int, ranks: list[int]) -> Iterator[dict]:
        """Yield one dict per sample of steps first..last (1-based, inclusive) of `ranks`."""
        if self.steps_per_epoch == 0:
            raise SlmError(f"data.train holds fewer samples than one batch of {self.cfg.global_batch_size}")
        d = self.dataset
        cached: tuple[int, list[np.ndarray]] | None = None
        for step in range(first, last + 1):
            epoch, index = divmod(step - 1, self.steps_per_epoch)
            if cached is None or cached[0] != epoch:
                cached = (epoch, self._epoch(epoch))
            for rank in ranks:
                for position, sample_id in enumerate(cached[1][rank][index].tolist()):
                    shard = int(np.searchsorted(d.sample_offset_per_shard, sample_id, side="right") - 1)
                    stream = int(d.stream_per_shard[shard])
                    yield {"step": step, "epoch": epoch, "rank": rank, "position": position,
                           "stream": self.streams[stream],
                           "sample": sample_id - int(d.sample_offset_per_stream[stream]),
                           "shard": shard - int(d.shard_offset_per_stream[stream]),
                           "row": sample_id - int(d.sample_offset_per_shard[shard]), "global_id": sample_id}

    def samples(self, first: int, last: int, ranks: list[int], tokens: bool = False,
                documents: bool = False) -> list[dict]:
        """Return the `rows` of steps first..last with, if asked, each sample's token ids and source documents."""
        rows = list(self.rows(first, last, ranks))
        for row in rows:
            if tokens:
                row["tokens"] = self.tokens(row["global_id"]).tolist()
            if documents:
                row["documents"] = self.documents(row)
        return rows

    def tokens(self, global_id: int) -> np.ndarray:
        """Return the token ids of the sample with global id `global_id`, as the dataset reads it."""
        return self.dataset.get_item(global_id)["tokens"]

    def documents(self, row: dict) -> list[int] | None:
        """Return the source documents (indices in the split `slm tokenize` read) a sample holds, from its folder's
        record; None for shards written before slm kept one."""
        if row["stream"] not in self._documents:
            self._documents[row["stream"]] = read_documents(self.stream_folder(row["stream"]))
        record = self._documents[row["stream"]]
        return record.of_sample(row["sample"]) if record else None

    def stream_folder(self, stream: str) -> Path:
        """Return the folder `stream`'s shards are read from: its entry in `folders`, else the config's `local`."""
        if stream in self.folders:
            return self.folders[stream]
        split = self.cfg.data.train
        return Path(split.streams[stream].local if split.streams else split.local)


def _in_turn(per_worker: list[list]) -> list:
    """Order the batches as PyTorch's loader over several workers does: one batch from each in turn, skipping a worker
    that has ended."""
    out, index = [], 0
    while any(index < len(batches) for batches in per_worker):
        out += [batches[index] for batches in per_worker if index < len(batches)]
        index += 1
    return out


def run_config(target: Path) -> tuple[TrainConfig, int | None]:
    """Read the config of a run folder (its config.yaml, maybe someone else's: read, not run) or a yaml of yours, and
    the run's world size if a run recorded one."""
    if target.is_dir():
        config = checked_run_folder(target) / "config.yaml"
        if not config.is_file():
            raise SlmError(f"{target} is no run folder (no config.yaml): give a run folder or a config yaml")
        starts = (read_run_record(target) or {}).get("starts") or [{}]
        return load_saved_config(config), (starts[-1].get("hardware") or {}).get("processes")
    return load_config(target), None


def read_only(cfg: TrainConfig, scratch: Path, prog: str) -> dict[str, Path]:
    """Make `cfg` (a run folder's config, maybe someone else's) read each training stream's folder as Streaming's
    remote, copying what it needs into `scratch`: nothing is written where a config from elsewhere says (a compressed
    shard would be decompressed into its folder). A remote it names is never fetched. Return each stream's folder, as
    read; each is said, checked first as any shard folder."""
    split, folders = cfg.data.train, {}
    sources = split.streams.items() if split.streams else [("train", split)]
    for stream, source in sources:
        if source.remote:
            raise SlmError(f"the run's config reads data.train{'.streams.' + stream if split.streams else ''} from "
                           f"{source.remote}, which slm batches does not fetch for a run folder's config: give a "
                           "config yaml of yours instead (slm batches CONFIG.yaml)")
        folder = Path(source.local)
        check_shards(folder, hashes=False)
        folders[stream] = folder
        source.remote, source.local = str(folder.resolve()), str(scratch / stream)
        say(f"the samples of {stream} from {folder}, as the run's config.yaml names it (read, never written)", prog)
    return folders


def parse_steps(text: str, max_steps: int | None) -> tuple[int, int]:
    """Parse A:B (inclusive, 1-based), A: (to the end), or A."""
    first, sep, last = text.partition(":")
    try:
        a = int(first) if first else 1
        b = int(last) if last else (max_steps if sep else a)
    except ValueError:
        raise SlmError(f"--steps {text}: give steps as A:B, A: or A (numbers from 1)") from None
    if b is None:
        raise SlmError(f"--steps {text}: max_duration gives no step count; give the last step")
    if not 1 <= a <= b:
        raise SlmError(f"--steps {text}: need 1 <= A <= B")
    return a, b
