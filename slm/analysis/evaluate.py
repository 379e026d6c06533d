"""Evaluating models on MDS shards and lm-eval tasks (`slm eval`): the training metrics of one checkpoint as JSON,
or of every checkpoint of runs (run folders, Hub repos) as one table with a row per (run, batch, data, metric)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import torch
from streaming import StreamingDataset
from torch.utils.data import DataLoader
from tqdm import tqdm

from slm.analysis.harness import Harness, task_source
from slm.analysis.trained_models import Loaded, find_models, load_model, select
from slm.core import workarounds
from slm.core.errors import SlmError
from slm.core.foreign import checked_file
from slm.core.paths import partial_file, refuse_secrets
from slm.data.loading import check_compatible, check_shards, collate
from slm.data.shards import read_metadata
from slm.data.tokenizer import load_tokenizer, mismatch_hint, tokenizer_matches
from slm.training.metrics import build_metrics, byte_lengths
from slm.training.model import CausalLM, count_parameters

COLUMNS = ("model", "run", "architecture", "label", "batch", "tokens", "parameters", "data", "samples", "metric",
           "value")


def evaluate_loaded(loaded: Loaded, data: Path, batch_size: int = 16, max_batches: int | None = None) -> dict:
    """Compute the cross-entropy, perplexity, accuracy and bits per byte of a loaded model on the shards at `data`, and
    the number of samples read."""
    model = loaded.model
    meta = read_metadata(data)
    check_shards(data)
    tokenizer = load_tokenizer(loaded.tokenizer)
    if not tokenizer_matches(tokenizer, meta["tokenizer"]):
        raise SlmError(f"{data} was tokenized with {meta['tokenizer']['name']}, not with the model's tokenizer"
                       f"{mismatch_hint(tokenizer, meta['tokenizer'])}")
    check_compatible([(data, meta)], model.config.vocab_size, getattr(model.config, "max_position_embeddings", None))
    metrics = build_metrics(byte_lengths(tokenizer))
    wrapper = CausalLM(model, tokenizer, metrics=metrics)
    samples = 0
    with workarounds.streaming_datasets(), torch.no_grad():
        dataset = StreamingDataset(local=str(data), shuffle=False, batch_size=batch_size)
        try:
            for i, batch in enumerate(DataLoader(dataset, batch_size=batch_size, collate_fn=collate)):
                if max_batches is not None and i >= max_batches:
                    break
                samples += len(batch["input_ids"])
                outputs = wrapper.eval_forward(batch)
                for metric in metrics:
                    metric.update(outputs, wrapper.labels)
        finally:
            workarounds.stop_reading(dataset)
    return {"samples": samples, **{type(m).__name__: m.compute().item() for m in metrics}}


def evaluate(model_path: Path, data: Path | None, batch_size: int = 16, max_batches: int | None = None,
             harness: Harness | None = None) -> dict:
    """Compute the metrics of one checkpoint file or `slm export` folder on the shards at `data` and the harness's tasks
    (under "tasks": {"TASK/METRIC": value})."""
    eval_sources(data, harness)
    loaded = load_model(model_path)
    result = {"model": str(model_path)}
    if data is not None:
        result.update({"data": str(data), **evaluate_loaded(loaded, data, batch_size, max_batches)})
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
    wanted_sources = eval_sources(data, harness)
    todo = [(model, label, load, [s for s in wanted_sources if (model, label, s) not in have])
            for model in models for label, load in select(find_models(model), wanted, model).items()]
    skipped = sum(not missing for *_, missing in todo)
    todo = [item for item in todo if item[3]]
    out.parent.mkdir(parents=True, exist_ok=True)
    for model, label, load, missing in tqdm(todo, desc="Evaluating", unit="checkpoint"):
        with tempfile.TemporaryDirectory(prefix="slm-eval-") as tmp:
            loaded = load(Path(tmp))
            for source in missing:
                rows += source_rows(source, model, label, loaded, batch_size, max_batches, harness)
        _write_table(rows, out)
    return len(todo), skipped


def eval_sources(data: Path | None, harness: Harness | None) -> list[str]:
    """Return the eval table's `data` values of one checkpoint's rows: the MDS folder, then `lm-eval:TASK` per task."""
    found = ([str(data)] if data is not None else []) + ([task_source(t) for t in harness.tasks] if harness else [])
    if not found:
        raise SlmError("nothing to evaluate on: give --data MDS_FOLDER, --tasks NAME..., or both")
    return found


def source_rows(source: str, model: str, label: str, loaded: Loaded, batch_size: int = 16,
                max_batches: int | None = None, harness: Harness | None = None) -> list[dict]:
    """Return the eval table's rows of one checkpoint on one of `sources`: an MDS folder or an lm-eval task."""
    if harness is not None and source in map(task_source, harness.tasks):
        task = source.removeprefix(task_source(""))
        return [{**checkpoint_columns(model, label, loaded), "data": source, "samples": samples, "metric": metric,
                 "value": value} for metric, (samples, value) in harness.scores(loaded, task).items()]
    return table_rows(model, label, loaded, Path(source), batch_size, max_batches)


def checkpoint_columns(model: str, label: str, loaded: Loaded) -> dict:
    """Return the eval table's columns that say which checkpoint a row is of."""
    return {"model": model, "run": loaded.run, "architecture": loaded.model.config.model_type, "label": label,
            "batch": loaded.batch, "tokens": loaded.tokens, "parameters": count_parameters(loaded.model)}


def table_rows(model: str, label: str, loaded: Loaded, data: Path, batch_size: int = 16,
               max_batches: int | None = None) -> list[dict]:
    """Compute the eval table's rows (COLUMNS) of one checkpoint, `label` of MODEL, on the shards at `data`."""
    result = evaluate_loaded(loaded, data, batch_size, max_batches)
    common = {**checkpoint_columns(model, label, loaded), "data": str(data), "samples": result.pop("samples")}
    return [{**common, "metric": metric, "value": value} for metric, value in result.items()]
