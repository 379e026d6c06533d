"""Training config: yaml files merged with OmegaConf into typed dataclasses.

First the schema: the dataclasses below are the one set of defaults (the suite's own choices live in
`yamls/base.yaml`), each field documented where it is declared (docs/config.md is generated from them by
slm/core/config_reference.py), its value rule named beside it (the rules are in slm/core/config_rules.py). Then the
loading: a yaml may name its parent with `base: other.yaml` (relative to itself); `key=value` overrides from
the command line come last. An unknown or mistyped key, or a value its rule refuses, fails with one line naming
the key, where it came from, and the closest valid key. See docs/design.md, "Config".
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from slm.core.config_rules import (
    a_length,
    a_location,
    a_time,
    at_least_one,
    hub_repo,
    keep_count,
    microbatch,
    model_class,
    non_negative,
    one_of,
    optional_time,
    positive,
    ruled,
    safe_run_name,
    shard_folder,
    stream_mixture,
)
from slm.core.errors import Refused, SlmError
from slm.core.foreign import read_yaml, shown
from slm.core.paths import refuse_secrets, write_atomically


@dataclass
class StreamConfig:  # one source of a mixture (Streaming's `Stream`); no weight: each sample once an epoch
    """One stream of a split's mixture (`streams.NAME`): its folder or remote, its proportion or repeat per epoch."""

    local: str | None = ruled(None, a_location)  # folder of MDS shards, or the local cache of `remote`
    remote: str | None = ruled(None, a_location)  # hf://datasets/ORG/REPO/PATH, s3://..., or None
    # share of each epoch's samples, relative to the other streams' (an epoch keeps the streams' total sample count),
    # drawn with repetition where it exceeds the stream's size; on every stream of the split or on none
    proportion: float | None = None
    repeat: float | None = None  # times each sample is seen an epoch (0.5: a fresh half of them each epoch)


@dataclass
class DataSplit:  # a split (train or eval): one MDS folder, or a mixture of streams
    """The `data.train` / `data.eval` split of the config: its MDS shard folder (or remote), or a mixture of streams."""

    local: str | None = ruled(None, shard_folder)  # folder of MDS shards, or the local cache of `remote`
    remote: str | None = ruled(None, a_location)  # hf://datasets/ORG/REPO/PATH, s3://..., or None
    streams: dict[str, StreamConfig] = ruled(rule=stream_mixture, factory=dict)  # a mixture, instead of local/remote


@dataclass
class DataConfig:  # the shards and Streaming's reading of them (docs/design.md, "Data")
    """The `data` section: the train and eval splits, how Streaming reads them (shuffle, canonical nodes, workers)."""

    train: DataSplit = field(default_factory=DataSplit)  # the training split
    eval: DataSplit = field(default_factory=DataSplit)  # the evaluation split
    shuffle: bool = True  # shuffle the training samples (Streaming's shuffle, seeded by shuffle_seed)
    shuffle_seed: int = 1337  # the data order; independent of the init seed
    shuffle_algo: str = ruled("py1e", one_of("py1e", "py1br", "py1s", "py2s", "naive"))  # Streaming's shuffle algorithm
    num_canonical_nodes: int = 1  # fixed, so the sample order is the same on any number of nodes
    # loader processes per training process. 0 reads in the training process: MappedShards slices samples from
    # memory-mapped shards at >100k samples/s, and worker processes cost more in hand-over than they save
    # (bench/RESULTS.md). Raise it when bench/loader.py shows the loader below what training consumes
    num_workers: int = ruled(0, non_negative)


@dataclass
class OptimizerConfig:  # AdamW; weight decay on matrices only (not on norms and biases)
    """The `optimizer` section: AdamW's peak learning rate, weight decay, betas, epsilon and fused kernel."""

    lr: float = ruled(5e-4, positive)  # the peak learning rate (the schedule scales it)
    weight_decay: float = 0.1  # decoupled weight decay of the matrices
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's beta1, beta2
    eps: float = 1e-8  # AdamW's epsilon
    fused: bool = False  # torch's fused AdamW kernel (CUDA): fewer launches, last-bit different numerics


@dataclass
class SchedulerConfig:  # slm/training/schedules.py; docs/design.md, "Schedules": the curves, the rule for continuing
    """The `scheduler` section: the lr schedule's curve, warmup, final lr, horizon and wsd's decay."""

    name: str = ruled("cosine", one_of("cosine", "linear", "constant", "wsd"))  # cosine, linear, constant or wsd
    warmup: str = ruled("1000ba", a_time)  # linear from 0, then the schedule
    alpha_f: float = 0.0  # the final lr, as a fraction of optimizer.lr (cosine, linear, wsd)
    # cosine, linear: the duration the decay spans; None: max_duration at the run's first start. It is kept when
    # a run is continued to a larger max_duration (the lr then holds at alpha_f * lr)
    horizon: str | None = ruled(None, optional_time)
    decay: str = ruled("0.2", a_length)  # wsd: the decay's length, a fraction of max_duration (0.2) or a time (2000ba)
    decay_shape: str = ruled("linear", one_of("linear", "cosine", "sqrt"))  # wsd: 1 - x, cos, or 1 - sqrt(x)


@dataclass
class LoadConfig:  # a warm start: a new run branched off another run's checkpoint (docs/design.md, "Warm starts")
    """The `load` section: a warm start's checkpoint (file, run folder or Hub repo revision) and what of it to load."""

    # a checkpoint file, a run folder (its newest checkpoint), or a Hub repo ORG/NAME
    path: str | None = ruled(None, a_location)
    revision: str | None = None  # Hub repo: the checkpoint's batch (ba400); None: its latest
    weights_only: bool = True  # False: also the optimizer, schedule, data position and batch count


@dataclass
class HubConfig:  # publishing every checkpoint to a Hub model repo (docs/design.md, "The Hub")
    """The `hub` section: the model repo checkpoints go to, its visibility, exports, commit budget and retries."""

    repo: str | None = ruled(None, hub_repo)  # ORG/NAME model repo for checkpoints; None: local only
    private: bool = True  # create the repo private (an existing repo keeps its visibility)
    export: bool = True  # with repo: each checkpoint also in HF format on a branch named after it (ba400)
    # commits to the repo in any budget_window_s seconds, exports included: the Hub refuses more than 128 an hour
    max_commits_per_hour: int = ruled(100, at_least_one)
    budget_window_s: float = ruled(3600.0, positive)  # the Hub's window is an hour; tests shrink it
    retries: int = ruled(5, at_least_one)  # attempts per Hub call on transient errors (connection, 408, 5xx)
    retry_wait: float = 2.0  # seconds before the first retry; doubles each time (a 429 waits as the Hub asks)


@dataclass
class WandbConfig:  # Composer's W&B logger, on when project is set
    """The `logging.wandb` section: the W&B project (logging is on when it is set), entity, group and tags."""

    project: str | None = None  # set it to log to W&B (WANDB_MODE=offline works); run id from run_name
    entity: str | None = None  # the W&B team or user; None: your default
    group: str | None = None  # W&B's run group (e.g. the suite's name)
    tags: list[str] = field(default_factory=list)  # W&B's run tags


@dataclass
class LoggingConfig:  # loggers beside metrics.jsonl
    """The `logging` section: the loggers beside metrics.jsonl (W&B)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases


@dataclass
class ProfileConfig:  # Composer's profiler: a Chrome/Perfetto trace in the run folder's profile/ (docs/training.md)
    """The `profile` section: the batches Composer's profiler traces, those skipped first, and PyTorch's profiler."""

    batches: int = ruled(0, non_negative)  # batches to trace (each start of the run); 0: no profile
    skip_first: int = ruled(1, non_negative)  # batches to let pass first (start-up, `compile: true`), then 1 unrecorded
    torch: bool = False  # also PyTorch's profiler (every operator, its FLOPs and memory): profile/torch/, much larger


@dataclass
class TrainConfig:  # the top level of a training yaml
    """A whole training config (a yaml's top level): the run, its duration, batches, checkpoints, evals and sections."""

    base: str | None = None  # parent yaml, consumed while loading
    run_name: str | None = ruled(None, safe_run_name)  # defaults to the yaml's stem; reuse it to resume
    seed: int = 42  # model init
    max_duration: str = ruled("10ep", a_time)  # how long to train: 2000ba (batches), 10ep (epochs), 5000000tok
    global_batch_size: int = ruled(256, positive)  # samples an optimizer step, split evenly across processes
    device_microbatch_size: int | str | None = ruled(None, microbatch)  # a count, "auto" (GPU only); None: all
    precision: str | None = None  # None: fp32 on CPU, amp_bf16 on GPU
    compile: bool = False  # torch.compile the forward, loss and backward (Composer's compile_config)
    deterministic: bool = False  # GPU: bitwise-repeatable kernels (always on on CPU); costs speed
    # seconds the processes of a run wait for each other: at the start (every node at the rendezvous) and in each
    # collective (a node whose processes died); past it the run stops with an error naming the rendezvous
    dist_timeout: float = ruled(300.0, positive)
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    # the run folder: checkpoints, metrics.jsonl, run.json, config.yaml
    save_folder: str = ruled("checkpoints/{run_name}", a_location)
    save_interval: str = ruled("1000ba", a_time)  # a checkpoint every this long
    early_checkpoints: int = 512  # also save at batches 1, 2, 4, ... up to this; 0 turns them off
    # also save at the first batch that reaches 10^(k/N) tokens seen (k = 1, 2, ...) for N = this: the same token
    # counts in every run of a suite, whatever its batch size and sample length; 0 turns them off
    checkpoints_per_token_decade: int = ruled(0, non_negative)
    keep: int = ruled(-1, keep_count)  # keep the newest N periodic checkpoints (log-spaced ones stay); -1: all
    eval_interval: str = ruled("1000ba", a_time)  # an evaluation every this long; 0ba: none
    eval_batches: int = -1  # batches per evaluation; -1 = the whole eval split
    log_interval: str = ruled("10ba", a_time)  # console lines, metrics.jsonl rows and train metrics every this long
    # None: the tokenizer recorded in the train shards' slm-dataset.json
    tokenizer: str | None = ruled(None, a_location)
    data: DataConfig = field(default_factory=DataConfig)  # the shards
    # `class` (a causal LM's model_type, e.g. llama, mamba, gpt2) plus kwargs of its transformers config, or
    # `pretrained: FOLDER_OR_HUB_ID` (its weights and config)
    model: dict[str, Any] = ruled(rule=model_class, factory=dict)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # AdamW
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # the lr schedule
    load: LoadConfig = field(default_factory=LoadConfig)  # a warm start
    hub: HubConfig = field(default_factory=HubConfig)  # publishing to the Hub
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # W&B
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # a trace of a few batches
    sweep: dict[str, Any] = field(default_factory=dict)  # key: [values] for `slm sweep` / jobs/suite.*; not training's
    configs: list[str] = field(default_factory=list)  # the yaml files merged, in order (set by load_config)

    @property
    def folder(self) -> Path:
        """The run folder: checkpoints, metrics.jsonl, run.json, config.yaml."""
        return Path(self.save_folder.format(run_name=self.run_name))

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a plain dict, its sections nested (`dataclasses.asdict`)."""
        return dataclasses.asdict(self)


def check(node: Any, prefix: str = "", origins: dict[str, str] | None = None) -> None:
    """Apply every field's rule, depth first in field order; the first problem is raised, naming where the
    value was set (`origins`: dotted key -> the file or command line that set it last)."""
    for f in dataclasses.fields(node):
        key, value = prefix + f.name, getattr(node, f.name)
        rule = f.metadata.get("rule")
        problem = rule(key, value, node) if rule else None
        if problem:
            origin = next((origins[k] for k in (key, *_parents(key)) if k in (origins or {})), None)
            raise SlmError(problem + (f" (set in {origin})" if origin else ""))
        if dataclasses.is_dataclass(value):
            check(value, f"{key}.", origins)


def _parents(key: str) -> list[str]:
    """Return the dotted keys enclosing `key`, nearest first (a.b.c -> a.b, a)."""
    parts = key.split(".")
    return [".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1)]


def _leaves(node: Any, prefix: str = "") -> list[str]:
    """Return the dotted keys a yaml node sets."""
    if not isinstance(node, DictConfig):
        return [prefix.rstrip(".")]
    keys = [leaf for k, v in node.items_ex(resolve=False) for leaf in _leaves(v, f"{prefix}{k}.")]
    return keys or [prefix.rstrip(".")]


def _valid_keys(schema: DictConfig, dotted: str) -> list[str]:
    """Return the keys valid beside `dotted` (the same level of the schema)."""
    parent = dotted.rpartition(".")[0]
    node = OmegaConf.select(schema, parent) if parent else schema
    prefix = f"{parent}." if parent else ""
    return [prefix + k for k in node.keys()] if isinstance(node, DictConfig) else []


def _explain(e: OmegaConfBaseException, schema: DictConfig, origin: str) -> SlmError:
    """Turn an OmegaConf error into one line naming the key and `origin`: an unknown key with the closest valid one,
    a wrong type with the one expected."""
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError) or "Key '" in str(e) and "not in struct" in str(e):
        close = difflib.get_close_matches(key, _valid_keys(schema, key), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return SlmError(f"unknown config key '{key}' in {origin}{hint}")
    if isinstance(e, ValidationError):
        expected = OmegaConf.select(schema, key, throw_on_missing=False)
        kind = type(expected).__name__ if expected is not None else "another type"
        return SlmError(f"config key '{key}' in {origin} has the wrong type: {str(e).splitlines()[0]} "
                        f"(expected {kind})")
    return SlmError(f"bad config in {origin}: {str(e).splitlines()[0]}")


# An OmegaConf resolver call, `${oc.env:HF_TOKEN}`, `${oc.decode:...}` or any registered one: it reads the
# environment or runs code, and its value would be written to config.yaml, run.json, checkpoints and the Hub.
RESOLVER_CALL = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*:")


def refuse_resolvers(value: Any, where: str) -> None:
    """Refuse a yaml node or override value (unresolved) that calls a resolver, naming the resolver, not its
    value: slm writes the resolved config to files it publishes (docs/security.md)."""
    for text in _strings(OmegaConf.to_container(value, resolve=False) if isinstance(value, DictConfig) else value):
        call = RESOLVER_CALL.search(text)
        if call:
            raise Refused(f"{where} calls the resolver {call.group(1)} (${{{call.group(1)}:...}}): slm resolves no "
                          "interpolation that reads the environment or runs code, since the resolved config is "
                          "written to run.json, checkpoints and the Hub; write the value itself")


def _strings(value: Any) -> list[str]:
    """Collect every string in a container, keys included."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """Read the yaml `path` and its `base:` chain: [(file, its yaml)] from the root base down to `path`."""
    path = path.resolve()
    if path in seen:
        raise SlmError(f"config {path} names itself as a base (cycle: {' -> '.join(map(str, seen))})")
    if not path.is_file():
        raise SlmError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends
        raise SlmError(f"cannot parse {path}: {' '.join(str(e).split())}") from e
    if not isinstance(node, DictConfig):
        raise SlmError(f"{path} must hold a mapping of config keys, not a {type(node).__name__}")
    refuse_resolvers(node, str(path))
    base = node.get("base")
    chain = yaml_chain(path.parent / base, (*seen, path)) if base else []
    return [*chain, (path, node)]


def default_run_name(paths: Sequence[str | Path]) -> str:
    """Return the run_name of yamls that set none: their stems joined by '+' (`llama-1m+cooldown`)."""
    return "+".join(Path(p).stem for p in paths)


def parse_override(item: str) -> tuple[str, str]:
    """Split a `key=value` override into its key and value; one line when it is not of that form."""
    if "=" not in item:
        raise SlmError(f"override '{item}' is not of the form key=value")
    key, _, value = item.partition("=")
    return key.strip(), value


def load_config(paths: str | Path | Sequence[str | Path], overrides: Sequence[str] = ()) -> TrainConfig:
    """Merge the yamls left to right (each with its own `base:` chain), then the `key=value` overrides, into the
    schema, and check every value; an error names the file or override that set the key.

    run_name defaults to the yamls' stems joined by '+'; `configs` records the files merged.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise SlmError("no config file given: name at least one yaml")
    return _merged([link for path in paths for link in yaml_chain(path)], overrides, paths)


def load_saved_config(path: Path) -> TrainConfig:
    """Read a run folder's config.yaml, which may be someone else's (a run folder handed over, read, not run): plain
    yaml within a size bound and without aliases (slm/core/foreign.py), naming no `base:` (it names no other file),
    then the schema and its rules as any config; nothing it names is opened here."""
    data = read_yaml(path, "config")
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        raise SlmError(f"{path} must hold a mapping of config keys, not a {type(data).__name__}")
    if data.get("base") is not None:
        raise Refused(f"{path} names a base yaml ({shown(data['base'])}), which a saved config never does: refused "
                      "(docs/security.md)")
    try:
        node = OmegaConf.create(data)
    except OmegaConfBaseException as e:
        raise SlmError(f"cannot read {path}: {str(e).splitlines()[0]}") from e
    refuse_resolvers(node, str(path))
    return _merged([(path, node)], (), [path])


OFF_WHEN_EMPTY = ("hub.repo", "logging.wandb.project")  # "" means off, as None does


def _merged(chain: list[tuple[Path, DictConfig]], overrides: Sequence[str], paths: list[Path]) -> TrainConfig:
    """Merge the yamls of `chain` in order, then the overrides, into the schema; check every value."""
    schema = OmegaConf.structured(TrainConfig)
    cfg = schema.copy()
    origins: dict[str, str] = {}
    for file, node in chain:
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as e:
            raise _explain(e, schema, str(file)) from e
        origins.update(dict.fromkeys(_leaves(node), str(file)))
    for item in overrides:
        key, value = parse_override(item)
        refuse_resolvers(value, f"the override {key}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _explain(e, schema, f"the command line ({item})") from e
        origins[key] = f"the command line ({item})"
    cfg.base = None
    for key in OFF_WHEN_EMPTY:  # delphi's habit: out_repo="" turns publishing off
        if OmegaConf.select(cfg, key) == "":
            OmegaConf.update(cfg, key, None)
    cfg.run_name = cfg.run_name or default_run_name(paths)
    cfg.configs = [str(p) for p in paths]
    try:
        config: TrainConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # an interpolation that leads nowhere, or in a loop
        raise SlmError(f"bad config in {', '.join(map(str, paths))}: {str(e).splitlines()[0]}") from e
    refuse_secrets(config.to_dict(), "the config")  # a token pasted into a yaml or an override
    check(config, origins=origins)
    return config


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Save the resolved config as yaml (what `load_config` of that file gives back)."""
    write_atomically(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
