"""Evaluating models on MDS shards and lm-eval tasks (`slm eval`): the training metrics of one checkpoint as JSON,
or of every checkpoint of runs (run folders, Hub repos) as one table with a row per (run, batch, data, metric). The
split's samples are read once, for every checkpoint (slm/analysis/samples.py)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from slm.analysis.harness import Harness, task_source
from slm.analysis.samples import SplitSamples, check_data, split_samples
from slm.analysis.trained_models import Loaded, find_models, load_model, select
from slm.core.errors import SlmError
from slm.core.foreign import checked_file
from slm.core.paths import partial_file, refuse_secrets
from slm.training.metrics import build_metrics, byte_lengths
from slm.training.model import CausalLM, count_parameters

COLUMNS = ("model", "run", "architecture", "label", "batch", "tokens", "parameters", "data", "samples", "metric",
           "value")


def evaluate_loaded(loaded: Loaded, split: SplitSamples, batch_size: int = 16) -> dict:
    """Compute the cross-entropy, perplexity, accuracy and bits per byte of a loaded model on `split`'s samples, and
    the number of samples read."""
    tokenizer = check_data(loaded, split)
    metrics = build_metrics(byte_lengths(tokenizer))
    wrapper = CausalLM(loaded.model, tokenizer, metrics=metrics)
    with torch.no_grad():
        for _, ids in split.batches(batch_size):
            outputs = wrapper.eval_forward({"input_ids": ids, "labels": ids.clone()})
            for metric in metrics:
                metric.update(outputs, wrapper.labels)
    return {"samples": split.count, **{type(m).__name__: m.compute().item() for m in metrics}}


class Evaluation:
    """What each checkpoint is evaluated on: an MDS split (its samples read once, for every checkpoint) and/or a
    harness's tasks; `rows` are one checkpoint's rows of the eval table."""

    def __init__(self, split: SplitSamples | None, harness: Harness | None, batch_size: int):
        self.split, self.harness, self.batch_size = split, harness, batch_size
        self.sources = ([str(split.data)] if split else []) + \
            ([task_source(t) for t in harness.tasks] if harness else [])

    def rows(self, model: str, label: str, loaded: Loaded, sources: list[str] | None = None) -> list[dict]:
        """Return the eval table's rows of one checkpoint, `label` of MODEL, on `sources` (all, if None): the MDS
        folder's metrics, then each task's."""
        rows = []
        for source in self.sources if sources is None else sources:
            columns = {**checkpoint_columns(model, label, loaded), "data": source}
            if self.split is not None and source == str(self.split.data):
                result = evaluate_loaded(loaded, self.split, self.batch_size)
                samples = result.pop("samples")
                rows += [{**columns, "samples": samples, "metric": metric, "value": value}
                         for metric, value in result.items()]
            else:
                task = source.removeprefix(task_source(""))
                rows += [{**columns, "samples": samples, "metric": metric, "value": value}
                         for metric, (samples, value) in self.harness.scores(loaded, task).items()]
        return rows


def check_sources(data: Path | None, harness: Harness | None) -> None:
    """Refuse an evaluation on nothing (no --data, no --tasks), before any model is looked for."""
    if data is None and harness is None:
        raise SlmError("nothing to evaluate on: give --data MDS_FOLDER, --tasks NAME..., or both")


@contextmanager
def evaluation(data: Path | None, harness: Harness | None, batch_size: int = 16,
               max_batches: int | None = None) -> Iterator[Evaluation]:
    """Open what checkpoints are evaluated on: the first `max_batches` batches (all, if None) of the shards at `data`,
    and the harness's tasks."""
    check_sources(data, harness)
    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise SlmError("--batch-size and --max-batches must be at least 1")
    with split_samples(data, max_batches and max_batches * batch_size) if data is not None else nullcontext() \
            as split:
        yield Evaluation(split, harness, batch_size)


def evaluate(model_path: Path, data: Path | None, batch_size: int = 16, max_batches: int | None = None,
             harness: Harness | None = None) -> dict:
    """Compute the metrics of one checkpoint file or `slm export` folder on the shards at `data` and the harness's tasks
    (under "tasks": {"TASK/METRIC": value})."""
    check_sources(data, harness)
    loaded = load_model(model_path)
    with evaluation(data, harness, batch_size, max_batches) as on:
        result = {"model": str(model_path)}
        if on.split is not None:
            result.update({"data": str(data), **evaluate_loaded(loaded, on.split, batch_size)})
        if harness is not None:
            result["tasks"] = {metric: value for task in harness.tasks
                               for metric, (_, value) in harness.scores(loaded, task).items()}
    return result


def read_table(path: Path) -> list[dict]:
    """Read the rows of an eval table written before (none if there is no file)."""
    if not checked_file(path, "eval table").exists():
        return []
    try:
        table = pq.read_table(path) if path.suffix == ".parquet" else pcsv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise SlmError(f"{path} is no eval table ({str(e).splitlines()[0]}): move it away or give another --out") from e
    missing = set(COLUMNS) - set(table.column_names)
    if missing:
        raise SlmError(f"{path} is no eval table of slm (no column {', '.join(sorted(missing))})")
    rows = table.to_pylist()
    refuse_secrets(rows, f"the eval table {path}")  # its rows are written again with the new ones
    return rows


def _write_table(rows: list[dict], path: Path) -> None:
    """Write the eval table's rows to `path`, Parquet or CSV by its suffix, whole or not at all."""
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("model", pa.string()), ("run", pa.string()), ("architecture", pa.string()), ("label", pa.string()),
        ("batch", pa.int64()),
        ("tokens", pa.int64()), ("parameters", pa.int64()), ("data", pa.string()), ("samples", pa.int64()),
        ("metric", pa.string()), ("value", pa.float64())]))
    with partial_file(path) as tmp:
        (pq.write_table if path.suffix == ".parquet" else pcsv.write_csv)(table, str(tmp))


def evaluate_runs(models: list[str], data: Path | None, out: Path, wanted: str = "all", batch_size: int = 16,
                  max_batches: int | None = None, harness: Harness | None = None) -> tuple[int, int]:
    """Evaluate every selected checkpoint of each MODEL on the shards at `data` and the harness's tasks into the
    table `out`, skipping what is already in it; the table is rewritten after each checkpoint, so an interrupted
    call keeps what it did. (checkpoints evaluated, checkpoints skipped)."""
    if out.suffix not in (".parquet", ".csv"):
        raise SlmError(f"--out {out}: write a .parquet or .csv table")
    rows = read_table(out)
    have = {(row["model"], row["label"], row["data"]) for row in rows}
    check_sources(data, harness)
    chosen = [(model, label, load) for model in models for label, load in select(find_models(model), wanted,
                                                                                 model).items()]
    with evaluation(data, harness, batch_size, max_batches) as on:
        todo = [(model, label, load, [s for s in on.sources if (model, label, s) not in have])
                for model, label, load in chosen]
        skipped = sum(not missing for *_, missing in todo)
        todo = [item for item in todo if item[3]]
        out.parent.mkdir(parents=True, exist_ok=True)
        for model, label, load, missing in tqdm(todo, desc="Evaluating", unit="checkpoint"):
            with tempfile.TemporaryDirectory(prefix="slm-eval-") as tmp:
                rows += on.rows(model, label, load(Path(tmp)), missing)
            _write_table(rows, out)
    return len(todo), skipped


def checkpoint_columns(model: str, label: str, loaded: Loaded) -> dict:
    """Return the eval table's columns that say which checkpoint a row is of."""
    return {"model": model, "run": loaded.run, "architecture": loaded.model.config.model_type, "label": label,
            "batch": loaded.batch, "tokens": loaded.tokens, "parameters": count_parameters(loaded.model)}
