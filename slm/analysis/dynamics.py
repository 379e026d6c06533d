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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from slm.core.errors import SlmError
from slm.core.foreign import checked_folder
from slm.core.paths import partial_file
from slm.data.shards import read_documents

if TYPE_CHECKING:
    from slm.analysis.suite import Checkpoint, Run

MARGIN = 0.1  # nats
DEFINITION = ("age of acquisition: the first checkpoint from which the loss stays within `margin` nats of its final "
              "value at every later checkpoint; forgetting: a rise of the loss by more than `margin` nats from one "
              "checkpoint to the next")
METADATA_KEY = b"slm.analysis.dynamics"


@dataclass
class Dynamics:
    """The per-token losses of a run's checkpoints on one split, and what follows from them."""

    checkpoints: list[dict]  # label, batch, tokens: in training order
    token_ids: np.ndarray  # (samples, positions) int32, position 0 (<bos>) dropped
    losses: np.ndarray  # (checkpoints, samples, positions) float32
    documents: np.ndarray | None  # (samples, positions) int64
    margin: float

    @cached_property
    def acquired(self) -> np.ndarray:
        """(samples, positions): the index of the checkpoint of acquisition."""
        near_final = np.abs(self.losses - self.losses[-1]) <= self.margin
        stays = np.logical_and.accumulate(near_final[::-1], axis=0)[::-1]  # near the final value from here on
        return np.argmax(stays, axis=0)  # the last checkpoint always qualifies

    @cached_property
    def forgettings(self) -> np.ndarray:
        return (np.diff(self.losses, axis=0) > self.margin).sum(axis=0).astype(np.int32)

    def metadata(self, model: str, data: Path) -> dict[bytes, bytes]:
        return {METADATA_KEY: json.dumps({"definition": DEFINITION, "margin": self.margin, "model": model,
                                          "data": str(data), "checkpoints": self.checkpoints}).encode()}

    def per_position(self) -> pa.Table:
        """Return a table with a row per (sample, position)."""
        count, samples, positions = self.losses.shape
        acquired = self.acquired.ravel()
        batches = np.array([c["batch"] for c in self.checkpoints], dtype=np.int64)
        tokens = np.array([c["tokens"] if c["tokens"] is not None else -1 for c in self.checkpoints], dtype=np.int64)
        losses = self.losses.reshape(count, -1).T  # (rows, checkpoints)
        offsets = pa.array(np.arange(0, (losses.shape[0] + 1) * count, count, dtype=np.int32))
        columns = {
            "sample": pa.array(np.repeat(np.arange(samples, dtype=np.int64), positions)),
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
        ids = self.token_ids.ravel()
        present, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        means = np.stack([np.bincount(inverse, weights=step.ravel()) / counts for step in self.losses], axis=1)
        tokens = np.array([c["tokens"] if c["tokens"] is not None else np.nan for c in self.checkpoints])
        acquired_tokens = tokens[self.acquired.ravel()]
        order = np.argsort(inverse, kind="stable")
        groups = np.split(acquired_tokens[order], np.cumsum(counts)[:-1])
        forgettings = np.bincount(inverse, weights=self.forgettings.ravel()) / counts
        offsets = pa.array(np.arange(0, (len(present) + 1) * len(tokens), len(tokens), dtype=np.int32))
        return pa.table({
            "token_id": pa.array(present.astype(np.int32)),
            "count": pa.array(counts.astype(np.int64)),
            "mean_losses": pa.ListArray.from_arrays(offsets, pa.array(means.ravel().astype(np.float32))),
            "mean_final_loss": pa.array(means[:, -1].astype(np.float32)),
            "median_acquired_tokens": pa.array([float(np.median(g)) for g in groups]),
            "mean_forgettings": pa.array(forgettings.astype(np.float32)),
        })


def _table(checkpoint: Checkpoint, data: Path, logprobs: Path | None, max_samples: int | None,
           batch_size: int) -> pa.Table:
    """Return the logprobs table of one checkpoint: `slm logprobs`' file in `logprobs` if it holds enough samples."""
    if logprobs is not None and (logprobs / f"{checkpoint.label}.parquet").is_file():
        table = pq.read_table(logprobs / f"{checkpoint.label}.parquet")
        if max_samples is None or table.num_rows >= max_samples:
            return table.slice(0, max_samples) if max_samples else table
    from slm.analysis.logprobs import table_of

    return table_of(checkpoint.loaded(), data, batch_size, max_samples)


def _check_samples(token_ids: np.ndarray, data: Path, logprobs: Path) -> None:
    """Refuse log-probs tables (`--logprobs`) of other samples than the first ones of the split at `data`."""
    from streaming import StreamingDataset

    from slm.core import workarounds
    with workarounds.streaming_datasets():
        dataset = StreamingDataset(local=str(data), shuffle=False)
        split = [dataset[i]["tokens"] for i in range(min(len(token_ids), dataset.num_samples))]
    if len(split) < len(token_ids) or not np.array_equal(np.stack(split), token_ids):
        raise SlmError(f"the log-probs tables in {logprobs} are not of {data}'s samples (another split?): give "
                       "the split they were made from, or another --logprobs folder")


def _matrix(table: pa.Table, column: str) -> np.ndarray:
    """Return a list column of equal-length rows (every sample has seq_len tokens) as a (rows, seq_len) array."""
    values = table.column(column).combine_chunks()
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), -1)


def _token_documents(data: Path, samples: int, seq_len: int) -> np.ndarray | None:
    """Return (samples, seq_len - 1): the document each token (after the <bos>) of the first samples belongs to."""
    record = read_documents(data)
    if record is None:
        return None
    if record.seq_len != seq_len:
        raise SlmError(f"{data}: its document record is of samples of {record.seq_len} tokens, its shards of "
                       f"{seq_len}: tokenize the split again")
    ends = np.cumsum(record.document_tokens)  # the chunking rule: sample s holds tokens s*(seq_len-1) onwards
    starts = np.arange(samples, dtype=np.int64)[:, None] * (seq_len - 1)
    return np.searchsorted(ends, starts + np.arange(seq_len - 1, dtype=np.int64)[None], side="right")


def dynamics_of(run: Run, data: Path, margin: float = MARGIN, max_samples: int | None = None,
                logprobs: Path | None = None, batch_size: int = 16) -> Dynamics:
    """Compute the dynamics of every checkpoint of `run` on the shards at `data`."""
    if len(run.checkpoints) < 2:
        raise SlmError(f"{run.name} has {len(run.checkpoints)} checkpoint(s): dynamics need two or more")
    if margin <= 0:
        raise SlmError(f"the margin must be above 0 nats, got {margin}")
    if logprobs is not None:
        checked_folder(logprobs, "folder of log-prob tables")
    from tqdm import tqdm

    losses, token_ids = [], None
    for checkpoint in tqdm(run.checkpoints, desc=f"{run.name}: log-probs", unit="checkpoint"):
        table = _table(checkpoint, data, logprobs, max_samples, batch_size)
        ids = _matrix(table, "token_ids").astype(np.int32)
        if token_ids is None:
            token_ids = ids
            if logprobs is not None:
                _check_samples(ids, data, logprobs)
        elif not np.array_equal(ids, token_ids):
            raise SlmError(f"{run.name} {checkpoint.label}: its log-probs table holds other samples than the "
                           f"others' (a table of another split in {logprobs}?): move it away")
        losses.append(-_matrix(table, "logprobs").astype(np.float32)[:, 1:])
    samples, seq_len = token_ids.shape
    return Dynamics([{"label": c.label, "batch": c.batch, "tokens": c.tokens} for c in run.checkpoints],
                    token_ids[:, 1:], np.stack(losses), _token_documents(data, samples, seq_len), margin)


def write_dynamics(dynamics: Dynamics, out: Path, model: str, data: Path) -> tuple[Path, Path]:
    """Write the per-position table at `out` and the per-token one beside it, each whole or not at all."""
    if out.suffix != ".parquet":
        raise SlmError(f"--out {out}: write a .parquet table")
    tokens_out = out.with_name(f"{out.stem}-tokens.parquet")
    metadata = dynamics.metadata(model, data)
    out.parent.mkdir(parents=True, exist_ok=True)
    for table, path in ((dynamics.per_position(), out), (dynamics.per_token(), tokens_out)):
        with partial_file(path) as tmp:
            pq.write_table(table.replace_schema_metadata(metadata), tmp)
    return out, tokens_out


def plot_dynamics(dynamics: Dynamics, out: Path, token_ids: list[int] | None = None,
                  labels: dict[int, str] | None = None) -> Path:
    """Plot the mean loss over tokens seen of `token_ids` (default: the 8 most frequent), and the distribution of the
    ages of acquisition, as the PNG `out`."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slm.analysis.plot import save_figure

    per_token = dynamics.per_token()
    present = per_token.column("token_id").to_numpy()
    if token_ids is None:
        token_ids = present[np.argsort(-per_token.column("count").to_numpy(), kind="stable")[:8]].tolist()
    missing = sorted(set(token_ids) - set(present.tolist()))
    if missing:
        raise SlmError(f"token id(s) {', '.join(map(str, missing))} do not occur in the split's samples")
    x = [c["tokens"] if c["tokens"] is not None else c["batch"] for c in dynamics.checkpoints]
    unit = "tokens seen" if dynamics.checkpoints[0]["tokens"] is not None else "batch"
    means = per_token.column("mean_losses").to_pylist()
    fig, (curves, ages) = plt.subplots(1, 2, figsize=(12, 4.5))
    for token in token_ids:
        row = int(np.flatnonzero(present == token)[0])
        curves.plot(x, means[row], marker="o", label=(labels or {}).get(token, f"id {token}"))
    curves.set(xscale="log", xlabel=unit, ylabel="mean loss (nats)", title="loss per token over training")
    curves.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    curves.legend(fontsize=8)
    counts = np.bincount(dynamics.acquired.ravel(), minlength=len(x))
    ages.bar(range(len(x)), counts)
    ages.set_xticks(range(len(x)), [f"{v:,}" for v in x], rotation=45, ha="right", fontsize=8)
    ages.set(xlabel=f"checkpoint of acquisition ({unit})", ylabel="tokens of the split",
             title=f"ages of acquisition (margin {dynamics.margin} nats)")
    return save_figure(fig, out)
