"""Learning dynamics per token (`slm dynamics`, `Run.dynamics`): how each token's loss moves over a run's checkpoints.

From the per-token log-probs of every checkpoint on a split (the tables `slm logprobs` writes: read from
`--logprobs DIR` where they are there, computed otherwise), one table with a row per (sample, position) of the
split, position 0 (the `<bos>`) aside:

- `losses`: -log p(token | tokens before it) at each checkpoint, in training order; `final_loss` at the last;
- `acquired_batch`, `acquired_tokens`: the **age of acquisition**, the first checkpoint from which the loss stays
  within MARGIN nats of its final value at that checkpoint and every later one (so a token learnt, forgotten and
  learnt again is acquired at the second time);
- `forgettings`: the number of steps from one checkpoint to the next where the loss rises by more than MARGIN;
- `document`: the index, in the split `slm tokenize` read, of the document the token belongs to (from the shards'
  `slm-documents.npz`; null for shards without it).

and one row per token id (`TABLE` with `-tokens` before the suffix): its count, its mean loss at each checkpoint,
its median age of acquisition (in tokens seen) and its mean number of forgettings. Both tables carry the
definition, the margin and the checkpoints (label, batch, tokens) in their Parquet metadata (`slm.analysis.dynamics`).

`slm dynamics` works in chunks of samples (`write_dynamics`): every checkpoint's table is on disk (given, or
computed once into a scratch folder beside the output), read a chunk of rows at a time, and the chunk's losses,
with what is computed from them, take at most MEMORY_BOUND bytes, whatever the number of checkpoints and the size
of the split. The per-token table is accumulated over the chunks exactly (`Totals`): sums in the same order as
one pass makes them, and each token's median age from its count at each checkpoint, so the tables are the ones one
chunk gives, to the bit. `Run.dynamics` hands back the arrays of a split that fits in MEMORY_BOUND.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from slm.core.errors import SlmError
from slm.core.foreign import checked_folder
from slm.core.paths import partial_file
from slm.data.shards import read_documents, read_metadata

if TYPE_CHECKING:
    from slm.analysis.suite import Run

MARGIN = 0.1  # nats
DEFINITION = ("age of acquisition: the first checkpoint from which the loss stays within `margin` nats of its final "
              "value at every later checkpoint; forgetting: a rise of the loss by more than `margin` nats from one "
              "checkpoint to the next")
METADATA_KEY = b"slm.analysis.dynamics"
MEMORY_BOUND = 2 * 2**30  # bytes: what a chunk's losses and the arrays computed from them may take
BYTES_PER_LOSS = 32  # a loss (float32) and what is made of it: its row of the table, the flags, the differences


@dataclass
class Dynamics:
    """The per-token losses of a run's checkpoints on one split, and what follows from them."""

    checkpoints: list[dict]  # label, batch, tokens: in training order
    token_ids: np.ndarray  # (samples, positions) int32, position 0 (<bos>) dropped
    losses: np.ndarray  # (checkpoints, samples, positions) float32
    documents: np.ndarray | None  # (samples, positions) int64
    margin: float
    first_sample: int = 0  # of the split: the index of the first sample here (a chunk's)

    @cached_property
    def acquired(self) -> np.ndarray:
        """(samples, positions): the index of the checkpoint of acquisition."""
        near_final = np.abs(self.losses - self.losses[-1]) <= self.margin
        stays = np.logical_and.accumulate(near_final[::-1], axis=0)[::-1]  # near the final value from here on
        return np.argmax(stays, axis=0)  # the last checkpoint always qualifies

    @cached_property
    def forgettings(self) -> np.ndarray:
        """(samples, positions): the number of steps between checkpoints where the loss rises by more than `margin`."""
        return (np.diff(self.losses, axis=0) > self.margin).sum(axis=0).astype(np.int32)

    def per_position(self) -> pa.Table:
        """Return a table with a row per (sample, position)."""
        count, samples, positions = self.losses.shape
        acquired = self.acquired.ravel()
        batches = np.array([c["batch"] for c in self.checkpoints], dtype=np.int64)
        tokens = np.array([c["tokens"] if c["tokens"] is not None else -1 for c in self.checkpoints], dtype=np.int64)
        losses = self.losses.reshape(count, -1).T  # (rows, checkpoints)
        offsets = pa.array(np.arange(0, (losses.shape[0] + 1) * count, count, dtype=np.int32))
        columns = {
            "sample": pa.array(np.repeat(np.arange(self.first_sample, self.first_sample + samples, dtype=np.int64),
                                         positions)),
            "position": pa.array(np.tile(np.arange(1, positions + 1, dtype=np.int32), samples)),
            "token_id": pa.array(self.token_ids.ravel()),
            "document": pa.array(self.documents.ravel()) if self.documents is not None else
            pa.nulls(samples * positions, pa.int64()),
            "losses": pa.ListArray.from_arrays(offsets, pa.array(losses.ravel())),
            "final_loss": pa.array(losses[:, -1]),
            "acquired_batch": pa.array(batches[acquired]),
            "acquired_tokens": pa.array(np.where(tokens[acquired] >= 0, tokens[acquired], 0),
                                        mask=tokens[acquired] < 0),
            "forgettings": pa.array(self.forgettings.ravel()),
        }
        return pa.table(columns)

    def per_token(self) -> pa.Table:
        """Return a table with a row per token id that occurs: count, mean loss per checkpoint, median acquisition, mean
        forgettings."""
        totals = Totals(self.checkpoints, self.margin)
        totals.add(self)
        return totals.per_token()


class Totals:
    """What the per-token table, the summary and the plot need of a split, accumulated chunk by chunk exactly: per
    token id its count, its loss summed at each checkpoint and its forgettings summed (float64, each added in the
    split's order, as one pass over the whole split adds them), and how many of its positions were acquired at
    each checkpoint (its median age follows from those counts, exactly)."""

    def __init__(self, checkpoints: list[dict], margin: float):
        self.checkpoints, self.margin = checkpoints, margin
        self.counts = np.zeros(0, np.int64)  # per token id
        self.loss_sums = np.zeros((len(checkpoints), 0))  # (checkpoints, token ids)
        self.forgetting_sums = np.zeros(0)
        self.acquired_at = np.zeros((0, len(checkpoints)), np.int64)  # (token ids, checkpoints): positions acquired
        self.forgotten = 0  # positions forgotten at least once

    def add(self, chunk: Dynamics) -> None:
        """Add a chunk of samples, the chunks in the split's order."""
        ids = chunk.token_ids.ravel()
        grow = int(ids.max(initial=-1)) + 1 - len(self.counts)
        if grow > 0:
            self.counts = np.pad(self.counts, (0, grow))
            self.loss_sums = np.pad(self.loss_sums, ((0, 0), (0, grow)))
            self.forgetting_sums = np.pad(self.forgetting_sums, (0, grow))
            self.acquired_at = np.pad(self.acquired_at, ((0, grow), (0, 0)))
        np.add.at(self.counts, ids, 1)
        for sums, step in zip(self.loss_sums, chunk.losses, strict=True):
            np.add.at(sums, ids, step.ravel().astype(np.float64))
        forgettings = chunk.forgettings.ravel()
        np.add.at(self.forgetting_sums, ids, forgettings.astype(np.float64))
        np.add.at(self.acquired_at, (ids, chunk.acquired.ravel()), 1)
        self.forgotten += int((forgettings > 0).sum())

    @property
    def positions(self) -> int:
        """The number of positions added so far, over every chunk."""
        return int(self.counts.sum())

    def acquisitions(self) -> np.ndarray:
        """How many positions were acquired at each checkpoint."""
        return self.acquired_at.sum(axis=0)

    def middle_age(self) -> int:
        """Return the age of acquisition (tokens seen, or the batch where unknown) of the middle position in age
        order: the upper of the two middle ones."""
        ages = np.array([c["tokens"] or c["batch"] for c in self.checkpoints])
        return int(_at_rank(ages, self.acquisitions(), self.positions // 2))

    def per_token(self) -> pa.Table:
        """Return the per-token table of every chunk added."""
        present = np.flatnonzero(self.counts)
        counts = self.counts[present]
        means = (self.loss_sums[:, present] / counts).T
        tokens = np.array([c["tokens"] if c["tokens"] is not None else np.nan for c in self.checkpoints])
        offsets = pa.array(np.arange(0, (len(present) + 1) * len(tokens), len(tokens), dtype=np.int32))
        return pa.table({
            "token_id": pa.array(present.astype(np.int32)),
            "count": pa.array(counts.astype(np.int64)),
            "mean_losses": pa.ListArray.from_arrays(offsets, pa.array(means.ravel().astype(np.float32))),
            "mean_final_loss": pa.array(means[:, -1].astype(np.float32)),
            "median_acquired_tokens": pa.array([_median(tokens, row) for row in self.acquired_at[present]]),
            "mean_forgettings": pa.array((self.forgetting_sums[present] / counts).astype(np.float32)),
        })


def _at_rank(values: np.ndarray, counts: np.ndarray, rank: int) -> float:
    """Return the `rank`-th (from 0) of `values[i]` taken `counts[i]` times, in ascending order."""
    order = np.argsort(values, kind="stable")
    return values[order[np.searchsorted(np.cumsum(counts[order]), rank, side="right")]]


def _median(values: np.ndarray, counts: np.ndarray) -> float:
    """Return the median of `values[i]` taken `counts[i]` times, as `np.median` gives it (NaN if any is NaN)."""
    if np.isnan(values[counts > 0]).any():
        return float("nan")
    total = int(counts.sum())
    return float(np.mean([_at_rank(values, counts, (total - 1) // 2), _at_rank(values, counts, total // 2)]))


def _table_files(run: Run, data: Path, logprobs: Path | None, max_samples: int | None, batch_size: int | None,
                 scratch: Path) -> list[Path]:
    """Return each checkpoint's log-probs table file: `slm logprobs`' own in `logprobs` where it holds enough
    samples, else computed once into `scratch`."""
    from slm.analysis.logprobs import Reading, write_checkpoint_table
    from slm.analysis.samples import split_samples

    files = []
    with split_samples(data, max_samples) as split:  # read once for every checkpoint, where they fit
        for checkpoint in run.checkpoints:
            given = logprobs / f"{checkpoint.label}.parquet" if logprobs is not None else None
            if given is not None and given.is_file() and \
                    (max_samples is None or pq.ParquetFile(given).metadata.num_rows >= max_samples):
                files.append(given)
            else:
                files.append(scratch / f"{checkpoint.label}.parquet")
                write_checkpoint_table(checkpoint.loaded(), split, files[-1], Reading(batch_size))
    return files


def _rows(file: pq.ParquetFile, count: int, limit: int | None) -> Iterator[pa.Table]:
    """Yield a table's first `limit` rows (all, if None), `count` at a time, holding no more than that."""
    held = pa.table({"token_ids": pa.array([], pa.list_(pa.int32())), "logprobs": pa.array([], pa.list_(pa.float32()))})
    left = limit
    for batch in file.iter_batches(batch_size=count, columns=["token_ids", "logprobs"]):
        held = pa.concat_tables([held, pa.Table.from_batches([batch])])
        while held.num_rows >= count and left != 0:
            taken = held.slice(0, count if left is None else min(count, left))
            held, left = held.slice(taken.num_rows), None if left is None else left - taken.num_rows
            yield taken
    if held.num_rows and left != 0:
        yield held.slice(0, held.num_rows if left is None else left)


def _matrix(table: pa.Table, column: str) -> np.ndarray:
    """Return a list column of equal-length rows (every sample has seq_len tokens) as a (rows, seq_len) array."""
    values = table.column(column).combine_chunks()
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), -1)


def _document_ends(data: Path, seq_len: int) -> np.ndarray | None:
    """Return where each document of the split ends in its token stream (None for shards without a record)."""
    record = read_documents(data)
    if record is None:
        return None
    if record.seq_len != seq_len:
        raise SlmError(f"{data}: its document record is of samples of {record.seq_len} tokens, its shards of "
                       f"{seq_len}: tokenize the split again")
    return np.cumsum(record.document_tokens)


def _token_documents(ends: np.ndarray | None, first: int, samples: int, seq_len: int) -> np.ndarray | None:
    """Return (samples, seq_len - 1): the document each token (after the <bos>) of samples [first, first + samples)
    belongs to."""
    if ends is None:
        return None
    starts = np.arange(first, first + samples, dtype=np.int64)[:, None] * (seq_len - 1)  # the chunking rule
    return np.searchsorted(ends, starts + np.arange(seq_len - 1, dtype=np.int64)[None], side="right")


def _chunks(run: Run, files: list[Path], data: Path, logprobs: Path | None, max_samples: int | None, count: int,
            margin: float) -> Iterator[Dynamics]:
    """Yield the dynamics of the split `count` samples at a time, from every checkpoint's table file read in step;
    refuse tables of other samples than each other's, or, for tables given (`logprobs`), than the split's."""
    from streaming import StreamingDataset

    from slm.core import streaming_workarounds

    checkpoints = [{"label": c.label, "batch": c.batch, "tokens": c.tokens} for c in run.checkpoints]
    with ExitStack() as stack:
        stack.enter_context(streaming_workarounds.streaming_datasets())
        split = StreamingDataset(local=str(data), shuffle=False) if logprobs is not None else None
        readers = [_rows(stack.enter_context(pq.ParquetFile(file)), count, max_samples) for file in files]
        first, ends = 0, None
        for tables in zip_longest(*readers):
            if any(table is None or table.num_rows != tables[0].num_rows for table in tables):
                raise SlmError(f"{run.name}: its checkpoints' log-probs tables hold different numbers of samples (a "
                               f"table of another split in {logprobs}?): move it away")
            token_ids = _matrix(tables[0], "token_ids").astype(np.int32)
            for checkpoint, table in zip(run.checkpoints[1:], tables[1:], strict=True):
                if not np.array_equal(_matrix(table, "token_ids"), token_ids):
                    raise SlmError(f"{run.name} {checkpoint.label}: its log-probs table holds other samples than the "
                                   f"others' (a table of another split in {logprobs}?): move it away")
            samples, seq_len = token_ids.shape
            if first == 0:
                ends = _document_ends(data, seq_len)
            if split is not None and (first + samples > split.num_samples or not np.array_equal(
                    np.stack([split[i]["tokens"] for i in range(first, first + samples)]), token_ids)):
                raise SlmError(f"the log-probs tables in {logprobs} are not of {data}'s samples (another split?): "
                               "give the split they were made from, or another --logprobs folder")
            losses = np.stack([-_matrix(table, "logprobs").astype(np.float32)[:, 1:] for table in tables])
            yield Dynamics(checkpoints, token_ids[:, 1:], losses, _token_documents(ends, first, samples, seq_len),
                           margin, first)
            first += samples


def _checked(run: Run, margin: float, logprobs: Path | None) -> None:
    """Refuse dynamics of a run with fewer than two checkpoints, a margin not above 0 nats, or a `logprobs` folder
    with a link leading outside it."""
    if len(run.checkpoints) < 2:
        raise SlmError(f"{run.name} has {len(run.checkpoints)} checkpoint(s): dynamics need two or more")
    if margin <= 0:
        raise SlmError(f"the margin must be above 0 nats, got {margin}")
    if logprobs is not None:
        checked_folder(logprobs, "folder of log-prob tables")


def chunk_samples(checkpoints: int, seq_len: int) -> int:
    """Return how many samples' losses, and what is computed from them, fit in MEMORY_BOUND bytes."""
    return max(1, MEMORY_BOUND // (checkpoints * seq_len * BYTES_PER_LOSS))


def dynamics_of(run: Run, data: Path, margin: float = MARGIN, max_samples: int | None = None,
                logprobs: Path | None = None, batch_size: int | None = None) -> Dynamics:
    """Compute the dynamics of every checkpoint of `run` on the shards at `data`, in memory: refused for a split
    whose losses would take more than MEMORY_BOUND bytes (`write_dynamics` works in chunks)."""
    _checked(run, margin, logprobs)
    meta = read_metadata(data)
    samples = min(meta["samples"], max_samples or meta["samples"])
    if samples > chunk_samples(len(run.checkpoints), meta["seq_len"]):
        raise SlmError(f"{samples:,} samples x {meta['seq_len']} tokens x {len(run.checkpoints)} checkpoints take more "
                       f"than {MEMORY_BOUND / 2**30:.0f} GiB in memory: write the tables in chunks instead "
                       "(`slm dynamics`, or `Run.write_dynamics(data, out)`), or give max_samples")
    with tempfile.TemporaryDirectory(prefix="slm-dynamics-") as scratch:
        files = _table_files(run, data, logprobs, max_samples, batch_size, Path(scratch))
        return next(_chunks(run, files, data, logprobs, max_samples, max(samples, 1), margin))


def write_dynamics(run: Run, data: Path, out: Path, model: str, margin: float = MARGIN,
                   max_samples: int | None = None, logprobs: Path | None = None, batch_size: int | None = None,
                   chunk: int | None = None) -> Totals:
    """Write the per-position table of `run`'s checkpoints on the shards at `data` at `out` and the per-token one
    beside it, each whole or not at all, `chunk` samples at a time (default: as many as fit in MEMORY_BOUND);
    return the totals (the per-token figures, the acquisitions, the forgettings)."""
    _checked(run, margin, logprobs)
    if out.suffix != ".parquet":
        raise SlmError(f"--out {out}: write a .parquet table")
    if chunk is not None and chunk < 1:
        raise SlmError(f"--chunk-samples must be at least 1, got {chunk}")
    tokens_out = out.with_name(f"{out.stem}-tokens.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoints = [{"label": c.label, "batch": c.batch, "tokens": c.tokens} for c in run.checkpoints]
    metadata = {METADATA_KEY: json.dumps({"definition": DEFINITION, "margin": margin, "model": model,
                                          "data": str(data), "checkpoints": checkpoints}).encode()}
    totals = Totals(checkpoints, margin)
    count = chunk or chunk_samples(len(checkpoints), read_metadata(data)["seq_len"])
    with tempfile.TemporaryDirectory(prefix=".slm-dynamics-", dir=out.parent) as scratch, \
            partial_file(out) as tmp, ExitStack() as stack:
        files = _table_files(run, data, logprobs, max_samples, batch_size, Path(scratch))
        writer = None
        for dynamics in _chunks(run, files, data, logprobs, max_samples, count, margin):
            table = dynamics.per_position()
            if writer is None:
                writer = stack.enter_context(pq.ParquetWriter(tmp, table.schema.with_metadata(metadata)))
            writer.write_table(table.replace_schema_metadata(metadata))
            totals.add(dynamics)
    with partial_file(tokens_out) as tmp:
        pq.write_table(totals.per_token().replace_schema_metadata(metadata), tmp)
    return totals


def plot_dynamics(totals: Totals, out: Path, token_ids: list[int] | None = None,
                  labels: dict[int, str] | None = None) -> Path:
    """Plot the mean loss over tokens seen of `token_ids` (default: the 8 most frequent), and the distribution of the
    ages of acquisition, as the PNG `out`."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slm.analysis.plot import save_figure

    per_token = totals.per_token()
    present = per_token.column("token_id").to_numpy()
    if token_ids is None:
        token_ids = present[np.argsort(-per_token.column("count").to_numpy(), kind="stable")[:8]].tolist()
    missing = sorted(set(token_ids) - set(present.tolist()))
    if missing:
        raise SlmError(f"token id(s) {', '.join(map(str, missing))} do not occur in the split's samples")
    x = [c["tokens"] if c["tokens"] is not None else c["batch"] for c in totals.checkpoints]
    unit = "tokens seen" if totals.checkpoints[0]["tokens"] is not None else "batch"
    means = per_token.column("mean_losses").to_pylist()
    fig, (curves, ages) = plt.subplots(1, 2, figsize=(12, 4.5))
    for token in token_ids:
        row = int(np.flatnonzero(present == token)[0])
        curves.plot(x, means[row], marker="o", label=(labels or {}).get(token, f"id {token}"))
    curves.set(xscale="log", xlabel=unit, ylabel="mean loss (nats)", title="loss per token over training")
    curves.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    curves.legend(fontsize=8)
    ages.bar(range(len(x)), totals.acquisitions())
    ages.set_xticks(range(len(x)), [f"{v:,}" for v in x], rotation=45, ha="right", fontsize=8)
    ages.set(xlabel=f"checkpoint of acquisition ({unit})", ylabel="tokens of the split",
             title=f"ages of acquisition (margin {totals.margin} nats)")
    return save_figure(fig, out)
