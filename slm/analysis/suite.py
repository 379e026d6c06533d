"""A suite of runs as Python objects, for notebooks: what `slm.open` returns.

    import slm
    suite = slm.open("checkpoints/llama-*", "ORG/mamba-1m")  # run folders (globs allowed) and Hub model repos
    run = suite["llama-1m"]                 # or suite.runs[0]: .name .model_class .parameters .tokens_per_step
    run.checkpoints                         # in training order: .label .batch .tokens .samples
    checkpoint = run.checkpoint(tokens=2_000_000)  # the first one with at least 2M tokens seen
    model, tokenizer = checkpoint.model(), checkpoint.tokenizer()  # transformers objects, loaded anew each call
    checkpoint.nnsight(), checkpoint.transformer_lens()  # nnsight's LanguageModel, TransformerLens' bridge
    run.metrics()                           # pandas DataFrame, a row per logged batch (metrics.jsonl)
    suite.evals("data/mds/validation")      # DataFrame: a row per (run, checkpoint, metric), as `slm eval --out`
    suite.evals(tasks=["blimp"])            # lm-evaluation-harness tasks (the analysis extra), the same rows

A run folder's checkpoints are read through the trust gate (slm/core/trust.py); a Hub repo's only as its `ba{B}`
export branches (safetensors), downloaded into a cache folder kept under a byte budget, the least recently used
branch evicted first (docs/analysis.md, "From Python").
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slm.analysis.harness import analysis_package
from slm.analysis.hub_cache import CACHE_BUDGET, HubCache, default_cache
from slm.core.errors import SlmError
from slm.core.foreign import parsed_json
from slm.core.paths import is_local_path
from slm.core.run_folder import (
    METRICS,
    RUN_RECORD,
    check_run_record,
    checked_run_folder,
    parse_metrics,
    read_metrics,
    read_run_record,
)

if TYPE_CHECKING:
    import pandas
    import torch
    from transformers import PreTrainedTokenizerFast

    from slm.analysis.dynamics import Dynamics, Totals

@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run: where in training it was taken, and its model and tokenizer on demand."""

    run: Run = field(repr=False)
    batch: int
    tokens: int | None
    samples: int | None
    file: Path | None = field(default=None, repr=False)  # a run folder's checkpoint file
    branch: str | None = field(default=None, repr=False)  # a Hub repo's export branch

    @property
    def label(self) -> str:
        """The checkpoint's label, `ba{batch}` (e.g. ba400), as its export branch is named."""
        return f"ba{self.batch}"

    def export_folder(self) -> Path:
        """Return the Hub export branch of this checkpoint, in the cache (downloaded if need be)."""
        if self.branch is None:
            raise SlmError(f"{self.run.name} {self.label}: the Hub repo {self.run.source} has this checkpoint only "
                           "as a pickle, which slm loads from your own run folders only (docs/security.md): train "
                           "with hub.export=true for export branches")
        return self.run.cache.folder(self.run.source, self.branch)

    def model(self) -> torch.nn.Module:
        """Return the checkpoint's model, a transformers `PreTrainedModel` in eval mode, loaded anew on each call."""
        from slm.analysis.trained_models import load_checkpoint, load_export

        return (load_checkpoint(self.file) if self.file else load_export(self.export_folder())).model

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """Return the tokenizer the run trained with."""
        from slm.data.tokenizer import load_tokenizer

        if self.file is None:
            return load_tokenizer(str(self.export_folder()))
        return load_tokenizer(self.run.info["tokenizer"], content_hash=self.run.info.get("tokenizer_hash"))

    def loaded(self):
        """Return the model with where it was taken (slm.analysis.trained_models.Loaded), as `slm eval` and
        `slm logprobs` take it."""
        from slm.analysis.trained_models import Loaded

        if self.file is None:
            return Loaded(self.model(), str(self.export_folder()), self.run.name, self.batch, self.tokens)
        return Loaded(self.model(), self.run.info.get("tokenizer"), self.run.name, self.batch, self.tokens,
                      self.run.info.get("tokenizer_hash"))

    def nnsight(self):
        """Return the checkpoint as nnsight's `TransformersModel` (what its deprecated `LanguageModel` is; the analysis
        extra), given its tokenizer: nnsight 0.8.1 finds none by itself under transformers 5 (docs/analysis.md)."""
        nnsight = analysis_package("nnsight", "Checkpoint.nnsight()")
        return nnsight.TransformersModel(self.model(), tokenizer=self.tokenizer(), task="text-generation")

    def transformer_lens(self):
        """Return the checkpoint as TransformerLens' `TransformerBridge` (the analysis extra): hooks and
        `run_with_cache` over the transformers model, llama and mamba alike."""
        bridge = analysis_package("transformer_lens.model_bridge", "Checkpoint.transformer_lens()")
        return bridge.TransformerBridge.boot_transformers(f"{self.run.name}-{self.label}", hf_model=self.model(),
                                                          tokenizer=self.tokenizer(), trust_remote_code=False)

    def logprobs(self, data: str | Path, max_samples: int | None = None,
                 batch_size: int | None = None) -> pandas.DataFrame:
        """Compute log p(token i | tokens < i) of every sample of the shards at `data` (or the first `max_samples`): the
        table `slm logprobs` writes for this checkpoint (`sample`, `token_ids`, `logprobs`; NaN at position 0)."""
        from slm.analysis.logprobs import table_of

        return table_of(self.loaded(), Path(data), batch_size, max_samples).to_pandas()


class Run:
    """One run of the suite: a run folder of slm/train.py or a Hub model repo its run published."""

    def __init__(self, source: str, info: dict[str, Any], rows: list[dict], checkpoints: list[dict],
                 folder: Path | None = None, cache: HubCache | None = None):
        self.source, self.info, self.folder, self.cache = source, info, folder, cache
        self._rows = rows
        self.name: str = info.get("run_name") or Path(source).name
        self.config: dict[str, Any] = info.get("config", {})
        per_sample = _tokens_per_sample(rows, self.config.get("global_batch_size"))
        self.checkpoints: list[Checkpoint] = [
            Checkpoint(self, c["batch"], c.get("tokens", _times(per_sample, c.get("samples"))), c.get("samples"),
                       c.get("file"), c.get("branch")) for c in sorted(checkpoints, key=lambda c: c["batch"])]

    def __repr__(self) -> str:
        return (f"Run({self.name!r}, {self.model_class}, {self.parameters or '?'} parameters, "
                f"{len(self.checkpoints)} checkpoints, from {self.source})")

    @property
    def model_class(self) -> str | None:
        """The run's model class name, from its config (`model.class`, else `model.pretrained`); None if neither."""
        model = self.config.get("model", {})
        name = model.get("class") or model.get("pretrained")
        return str(name).rsplit(".", 1)[-1] if name else None

    @property
    def parameters(self) -> int | None:
        """The run's parameter count, from its run.json (None where it records none)."""
        return self.info.get("parameters")

    @property
    def tokens_per_step(self) -> int | None:
        """Tokens of one optimizer step (the global batch)."""
        per_sample = _tokens_per_sample(self._rows, self.config.get("global_batch_size"))
        return _times(per_sample, self.config.get("global_batch_size"))

    @property
    def status(self):
        """Where the run stands (slm.analysis.status.RunStatus, as `slm status` shows it); None for a Hub repo."""
        from slm.analysis.status import run_status

        return run_status(self.folder) if self.folder else None

    def checkpoint(self, batch: int | None = None, tokens: int | None = None) -> Checkpoint:
        """Return the checkpoint of batch `batch`, or the first with at least `tokens` tokens seen."""
        if (batch is None) == (tokens is None):
            raise SlmError("give one of batch= and tokens=")
        for c in self.checkpoints:
            if (c.batch == batch) if batch is not None else (c.tokens is not None and c.tokens >= tokens):
                return c
        have = ", ".join(f"{c.label} ({c.tokens:,} tokens)" if c.tokens else c.label for c in self.checkpoints)
        wanted = f"batch {batch}" if batch is not None else f"{tokens:,} tokens or more"
        raise SlmError(f"{self.name} has no checkpoint at {wanted}; it has: {have or 'none'}")

    def batches(self, steps: int | str, tokens: bool = False, documents: bool = True) -> pandas.DataFrame:
        """Return the samples every rank trained on at step `steps` (or "A:B", inclusive), as `slm batches --out` gives
        them: a row per sample, with its token ids and its source documents if asked (run folders only)."""
        import pandas

        from slm.analysis.batches import Batches, Processes, parse_steps, read_only, run_config
        from slm.core import streaming_workarounds

        if self.folder is None:
            raise SlmError(f"{self.name}: batches are computed from a run folder's config and shards, not from the "
                           f"Hub repo {self.source}")
        cfg, recorded = run_config(self.folder)
        ranks = recorded or 1
        with tempfile.TemporaryDirectory(prefix="slm-batches-") as scratch, streaming_workarounds.streaming_datasets():
            folders = read_only(cfg, Path(scratch), "slm.open")
            batches = Batches(cfg, Processes(1, ranks, max(cfg.data.num_workers, 1)), folders)
            first, last = parse_steps(str(steps), batches.max_steps())
            return pandas.DataFrame(batches.samples(first, last, list(range(ranks)), tokens, documents))

    def dynamics(self, data: str | Path, margin: float | None = None, max_samples: int | None = None,
                 logprobs: str | Path | None = None, batch_size: int | None = None) -> Dynamics:
        """Compute per-token learning dynamics over the run's checkpoints on the shards at `data`
        (slm/analysis/dynamics.py): the losses, ages of acquisition and forgettings; `.per_position()` and
        `.per_token()` are the tables `slm dynamics` writes (pyarrow: `.to_pandas()`). `logprobs`: a folder of
        `slm logprobs` tables to reuse."""
        from slm.analysis.dynamics import MARGIN, dynamics_of

        return dynamics_of(self, Path(data), MARGIN if margin is None else margin, max_samples,
                           Path(logprobs) if logprobs else None, batch_size)

    def write_dynamics(self, data: str | Path, out: str | Path, margin: float | None = None,
                       max_samples: int | None = None, logprobs: str | Path | None = None,
                       batch_size: int | None = None, chunk_samples: int | None = None) -> Totals:
        """Write the tables of `dynamics` (the per-position one at `out`, a .parquet file, the per-token one beside
        it) in chunks of samples, in bounded memory, for a split of any size; return the per-token totals."""
        from slm.analysis.dynamics import MARGIN, write_dynamics

        return write_dynamics(self, Path(data), Path(out), self.name, MARGIN if margin is None else margin,
                              max_samples, Path(logprobs) if logprobs else None, batch_size, chunk_samples)

    def metrics(self) -> pandas.DataFrame:
        """Return the run's metrics.jsonl: a row per logged batch, a column per metric."""
        import pandas

        return pandas.DataFrame(self._rows)


def _tokens_per_sample(rows: list[dict], global_batch_size: int | None) -> int | None:
    """Return the tokens of one sample, from the first metrics row with tokens and batch; None where unknown."""
    row = next((r for r in rows if r.get("tokens") and r.get("batch")), None)
    return row["tokens"] // (row["batch"] * global_batch_size) if row and global_batch_size else None


def _times(a: int | None, b: int | None) -> int | None:
    """Return `a * b`, or None where either is unknown."""
    return a * b if a is not None and b is not None else None


def run_from_folder(folder: Path) -> Run:
    """Open a run folder of slm/train.py: its run.json, metrics.jsonl and complete checkpoints."""
    from slm.core.run_folder import checkpoints, is_complete

    info = read_run_record(checked_run_folder(folder))
    if info is None:
        raise SlmError(f"{folder} has no run.json: give the run folder of slm/train.py (its save_folder, e.g. "
                       "checkpoints/RUN_NAME)")
    rows = read_metrics(folder)
    by_batch = {r["batch"]: r for r in rows if "batch" in r}
    gbs = info.get("config", {}).get("global_batch_size")
    found = [{"batch": b, "file": p, "samples": _times(b, gbs), **({"tokens": by_batch[b]["tokens"]}
             if "tokens" in by_batch.get(b, {}) else {})}
             for b, p in checkpoints(folder).items() if is_complete(p)]
    return Run(str(folder), info, rows, found, folder=folder)


def run_from_hub(repo: str, cache: HubCache) -> Run:
    """Open a Hub model repo written by a run with hub.repo: its manifest, run.json and metrics.jsonl (on `main`)."""
    from slm.hub.client import Hub
    from slm.hub.manifest import MANIFEST, Manifest

    hub = Hub()
    try:
        manifest = Manifest.parse(hub.read_file(repo, MANIFEST), f"{MANIFEST} of the Hub repo {repo}")
        where = f"{RUN_RECORD} of the Hub repo {repo}"
        info = check_run_record(parsed_json(hub.read_file(repo, RUN_RECORD), where), where)
        rows = parse_metrics(hub.read_file(repo, METRICS), f"{METRICS} of the Hub repo {repo}")
    except FileNotFoundError:
        raise SlmError(f"{repo} is neither a local run folder nor the Hub model repo of an slm run (no "
                       f"{MANIFEST}, run.json and metrics.jsonl on its main branch)") from None
    except ValueError as e:
        raise SlmError(f"the Hub repo {repo}: {e}") from e
    found = [{"batch": batch, "tokens": e.get("tokens"), "samples": e.get("samples"), "branch": e.get("branch")}
             for batch, e in manifest.entries.items()]
    return Run(repo, info, rows, found, cache=cache)


class Suite:
    """The runs `slm.open` was given, in the order given (a glob's matches sorted)."""

    def __init__(self, runs: list[Run]):
        self.runs = runs

    def __repr__(self) -> str:
        return "Suite(\n" + "".join(f"  {run!r},\n" for run in self.runs) + ")"

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, key: int | str) -> Run:
        if isinstance(key, int):
            return self.runs[key]
        for run in self.runs:
            if run.name == key:
                return run
        raise KeyError(f"no run {key!r} in the suite; it has: {', '.join(run.name for run in self.runs)}")

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint of every run, run by run."""
        return [c for run in self.runs for c in run.checkpoints]

    def evals(self, data: str | Path | None = None, tasks: list[str] | tuple[str, ...] = (),
              include_path: str | Path | None = None, limit: int | None = None, batch_size: int = 16,
              max_batches: int | None = None) -> pandas.DataFrame:
        """Evaluate every checkpoint on the MDS folder `data` and lm-evaluation-harness `tasks`
        (slm/analysis/harness.py): a row per (run, checkpoint, data, metric), the columns of `slm eval --out`
        (slm/analysis/evaluate.py)."""
        import pandas

        from slm.analysis.evaluate import COLUMNS, evaluation
        from slm.analysis.harness import Harness

        harness = Harness(list(tasks), Path(include_path) if include_path else None, limit, batch_size) if tasks \
            else None
        rows = []
        with evaluation(Path(data) if data is not None else None, harness, batch_size, max_batches) as on:
            for c in self.checkpoints:
                rows += on.rows(c.run.source, c.label, c.loaded())
        return pandas.DataFrame(rows, columns=list(COLUMNS))


def open_suite(*sources: str | Path, cache_dir: str | Path | None = None, cache_budget: int = CACHE_BUDGET) -> Suite:
    """Open the suite of runs named by `sources`: run folders (a glob matches several) and Hub model repos
    `ORG/NAME`."""
    if not sources:
        raise SlmError("slm.open needs at least one run folder, glob or Hub model repo")
    cache = HubCache(Path(cache_dir).expanduser() if cache_dir else default_cache(), cache_budget)
    runs = []
    for source in map(str, sources):
        if glob.has_magic(source):
            folders = sorted(Path(p) for p in glob.glob(os.path.expanduser(source)) if Path(p).is_dir())
            if not folders:
                raise SlmError(f"no run folder matches {source}")
            runs += [run_from_folder(folder) for folder in folders]
        elif Path(source).expanduser().is_dir():
            runs.append(run_from_folder(Path(source).expanduser()))
        elif is_local_path(source):
            raise SlmError(f"run folder not found: {source}")
        else:
            runs.append(run_from_hub(source, cache))
    return Suite(runs)
