"""Training config: yaml files merged with OmegaConf into typed dataclasses.

A yaml may name its parent with `base: other.yaml` (relative to itself); `key=value` overrides
from the command line come last. The dataclasses below are the one set of defaults (the suite's
own choices live in `yamls/base.yaml`), and each field's value rule sits beside it. An unknown
or mistyped key, or a value its rule refuses, fails with one line naming the key, where it came
from, and the closest valid key. See docs/design.md, "Config".
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from slm.errors import SlmError
from slm.paths import write_atomically

# A value rule: (dotted key, value, the dataclass holding it) -> the problem as one line, or None.
Rule = Callable[[str, Any, Any], "str | None"]
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
HUB_REPO = re.compile(r"[\w.-]+/[\w.-]+")


def ruled(default: Any = None, rule: Rule | None = None, *, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a value rule that `check` applies."""
    kwargs = {"default_factory": factory} if factory else {"default": default}
    return field(metadata={"rule": rule} if rule else {}, **kwargs)


def positive(key: str, value: Any, owner: Any) -> str | None:
    return None if value > 0 else f"config key '{key}' must be positive, got {value}"


def non_negative(key: str, value: Any, owner: Any) -> str | None:
    return None if value >= 0 else f"config key '{key}' must be 0 or more, got {value}"


def at_least_one(key: str, value: Any, owner: Any) -> str | None:
    return None if value >= 1 else f"config key '{key}' must be at least 1, got {value}"


def a_time(key: str, value: Any, owner: Any) -> str | None:
    """A Composer time string: a number with a unit."""
    from composer.core import Time  # here, not at the top: `import composer` takes seconds

    try:
        Time.from_timestring(str(value))
        return None
    except ValueError:
        return (f"config key '{key}' = '{value}' is not a time: use a number with a unit, e.g. 2000ba (batches), "
                "10ep (epochs), 5000000tok (tokens)")


def shard_folder(key: str, value: Any, owner: Any) -> str | None:
    if value is not None or getattr(owner, "streams", None):  # a split of streams has no folder of its own
        return None
    return f"config key '{key}' is not set: give the folder of the MDS shards"


def stream_mixture(key: str, value: Any, owner: Any) -> str | None:
    """A split's `streams`: each with its folder; one kind of weight, as Streaming's `Stream` takes them."""
    if not value:
        return None
    split = key.rpartition(".")[0]
    if owner.local is not None or owner.remote is not None:
        return (f"config key '{key}' replaces {split}.local and {split}.remote: set them to null (yamls/base.yaml "
                "sets local), or drop the streams")
    for name, stream in value.items():
        if stream.local is None:
            return (f"config key '{key}.{name}.local' is not set: give the folder of the stream's MDS shards "
                    "(with a remote, its local cache)")
        if stream.proportion is not None and stream.repeat is not None:
            return f"config key '{key}.{name}' sets both proportion and repeat: give one"
        for weight in ("proportion", "repeat"):
            if getattr(stream, weight) is not None and getattr(stream, weight) <= 0:
                return f"config key '{key}.{name}.{weight}' must be positive, got {getattr(stream, weight)}"
    folders: dict[str, str] = {}  # Streaming refuses two streams in one folder
    for name, stream in value.items():
        other = folders.setdefault(str(Path(stream.local).resolve()), name)
        if other != name:
            return f"config keys '{key}.{other}.local' and '{key}.{name}.local' name one folder: give each its own"
    with_proportion = [name for name, stream in value.items() if stream.proportion is not None]
    if with_proportion and len(with_proportion) < len(value):
        other = next(name for name in value if name not in with_proportion)
        return (f"config key '{key}.{other}' has no proportion but '{key}.{with_proportion[0]}' has one: give "
                "every stream a proportion, or none (repeat, or each sample once an epoch)")
    return None


def safe_run_name(key: str, value: Any, owner: Any) -> str | None:
    if RUN_NAME.match(value) and ".." not in value:
        return None
    return f"run_name '{value}' is not a safe folder name: use letters, digits and . _ + - (no '/' or '..')"


def microbatch(key: str, value: Any, owner: Any) -> str | None:
    if value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return None
    return f"config key '{key}' must be a positive integer or 'auto', got {value!r}"


def keep_count(key: str, value: Any, owner: Any) -> str | None:
    if value == -1 or value > 0:
        return None
    return f"config key '{key}' must be -1 (keep all) or a positive number, got {value}"


def model_class(key: str, value: Any, owner: Any) -> str | None:
    if "class" in value or value.get("pretrained"):
        return None
    return (f"config key '{key}.class' is not set: use a causal LM's model_type (llama, mamba, gpt2, ...) or "
            f"class name, or {key}.pretrained (a folder or Hub id)")


def hub_repo(key: str, value: Any, owner: Any) -> str | None:
    if value is None or HUB_REPO.fullmatch(value):
        return None
    return f"config key '{key}' = '{value}' is not a Hub repo id: use ORG/NAME"


@dataclass
class StreamConfig:  # one source of a mixture: Streaming's `Stream`
    local: str | None = None  # folder of MDS shards, or the local cache of `remote`
    remote: str | None = None  # hf://datasets/ORG/REPO/PATH, s3://..., or None
    # At most one weight; proportion on every stream of the split or on none. Neither: each sample once an epoch.
    proportion: float | None = None  # share of each epoch's samples (relative to the others'; an epoch keeps the
    # streams' total sample count), drawn with repetition when it exceeds the stream's size
    repeat: float | None = None  # times each sample is seen an epoch (0.5: a fresh half of them each epoch)


@dataclass
class DataSplit:
    local: str | None = ruled(None, shard_folder)  # folder of MDS shards, or the local cache of `remote`
    remote: str | None = None  # hf://datasets/ORG/REPO/PATH, s3://..., or None
    streams: dict[str, StreamConfig] = ruled(rule=stream_mixture, factory=dict)  # a mixture, instead of local/remote


@dataclass
class DataConfig:
    train: DataSplit = field(default_factory=DataSplit)
    eval: DataSplit = field(default_factory=DataSplit)
    shuffle: bool = True
    shuffle_seed: int = 1337  # the data order; independent of the init seed
    shuffle_algo: str = "py1e"
    num_canonical_nodes: int = 1  # fixed, so the sample order is the same on any number of nodes
    # Loader processes per training process. 0 reads in the training process: MappedShards slices samples from
    # memory-mapped shards at >100k samples/s, and worker processes cost more in hand-over than they save
    # (bench/RESULTS.md). Raise it when bench/loader.py shows the loader below what training consumes.
    num_workers: int = ruled(0, non_negative)


@dataclass
class OptimizerConfig:  # AdamW; weight decay on matrices only
    lr: float = ruled(5e-4, positive)
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    fused: bool = False  # torch's fused AdamW kernel (CUDA): fewer launches, last-bit different numerics


def one_of(*choices: str) -> Rule:
    def rule(key: str, value: Any, owner: Any) -> str | None:
        return None if value in choices else f"config key '{key}' = '{value}' is not one of {', '.join(choices)}"
    return rule


def optional_time(key: str, value: Any, owner: Any) -> str | None:
    return None if value is None else a_time(key, value, owner)


def a_length(key: str, value: Any, owner: Any) -> str | None:
    """A fraction of max_duration in (0, 1], or a time."""
    try:
        return None if 0 < float(value) <= 1 else f"config key '{key}' = {value}: a fraction must be in (0, 1]"
    except ValueError:
        return a_time(key, value, owner)


@dataclass
class SchedulerConfig:  # slm/schedules.py; docs/design.md, "Schedules", has the curves and the rule for continuing
    name: str = ruled("cosine", one_of("cosine", "linear", "constant", "wsd"))
    warmup: str = ruled("1000ba", a_time)  # linear from 0, then the schedule
    alpha_f: float = 0.0  # the final lr, as a fraction of optimizer.lr (cosine, linear, wsd)
    # cosine, linear: the duration the decay spans; None: max_duration at the run's first start. It is kept when
    # a run is continued to a larger max_duration (the lr then holds at alpha_f * lr).
    horizon: str | None = ruled(None, optional_time)
    decay: str = ruled("0.2", a_length)  # wsd: the decay's length, a fraction of max_duration (0.2) or a time (2000ba)
    decay_shape: str = ruled("linear", one_of("linear", "cosine", "sqrt"))  # wsd: 1 - x, cos, or 1 - sqrt(x)


@dataclass
class LoadConfig:  # a warm start: a new run branched off another run's checkpoint (docs/design.md, "Warm starts")
    path: str | None = None  # a checkpoint file, a run folder (its newest checkpoint), or a Hub repo ORG/NAME
    revision: str | None = None  # Hub repo: the checkpoint's batch (ba400); None: its latest
    weights_only: bool = True  # False: also the optimizer, schedule, data position and batch count


@dataclass
class HubConfig:
    repo: str | None = ruled(None, hub_repo)  # ORG/NAME model repo for checkpoints (created private); None: local
    private: bool = True
    export: bool = True  # with repo: each checkpoint also in HF format on a branch named after it (ba400)
    # Commits to the repo in any budget_window_s seconds, exports included: the Hub refuses more than 128 an hour.
    max_commits_per_hour: int = ruled(100, at_least_one)
    budget_window_s: float = ruled(3600.0, positive)  # the Hub's window is an hour; tests shrink it
    retries: int = ruled(5, at_least_one)  # attempts per Hub call on transient errors (connection, 408, 5xx)
    retry_wait: float = 2.0  # seconds before the first retry; doubles each time (a 429 waits as the Hub asks)


@dataclass
class WandbConfig:
    project: str | None = None  # set it to log to W&B (WANDB_MODE=offline works); run id from run_name
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    base: str | None = None  # parent yaml, consumed while loading
    run_name: str | None = ruled(None, safe_run_name)  # defaults to the yaml's stem; reuse it to resume
    seed: int = 42  # model init
    max_duration: str = ruled("10ep", a_time)
    global_batch_size: int = ruled(256, positive)  # split evenly across processes
    device_microbatch_size: Any = ruled(None, microbatch)  # int, or "auto" (GPU only); None: the whole batch
    precision: str | None = None  # None: fp32 on CPU, amp_bf16 on GPU
    compile: bool = False  # torch.compile the model (Composer's compile_config): faster steps after a warm-up
    deterministic: bool = False  # GPU: bitwise-repeatable kernels (always on on CPU); costs speed
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    save_folder: str = "checkpoints/{run_name}"
    save_interval: str = ruled("1000ba", a_time)
    early_checkpoints: int = 512  # also save at batches 1, 2, 4, ... up to this; 0 turns them off
    keep: int = ruled(-1, keep_count)  # keep the newest N periodic checkpoints (early ones always stay); -1: all
    eval_interval: str = ruled("1000ba", a_time)
    eval_batches: int = -1  # batches per evaluation; -1 = the whole eval split
    log_interval: str = ruled("10ba", a_time)
    tokenizer: str | None = None  # None: the tokenizer recorded in the train shards' slm-dataset.json
    data: DataConfig = field(default_factory=DataConfig)
    # `class` plus kwargs of the transformers config, or `pretrained: FOLDER_OR_HUB_ID` (its weights and config)
    model: dict[str, Any] = ruled(rule=model_class, factory=dict)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sweep: dict[str, Any] = field(default_factory=dict)  # key: [values] for `slm sweep` / jobs/suite.*; not training's
    configs: list[str] = field(default_factory=list)  # the yaml files merged, in order (set by load_config)

    @property
    def folder(self) -> Path:
        """The run folder: checkpoints, metrics.jsonl, run.json, config.yaml."""
        return Path(self.save_folder.format(run_name=self.run_name))

    def to_dict(self) -> dict[str, Any]:
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
    parts = key.split(".")
    return [".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1)]


def _leaves(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys a yaml node sets."""
    if not isinstance(node, DictConfig):
        return [prefix.rstrip(".")]
    keys = [leaf for k, v in node.items_ex(resolve=False) for leaf in _leaves(v, f"{prefix}{k}.")]
    return keys or [prefix.rstrip(".")]


def _valid_keys(schema: DictConfig, dotted: str) -> list[str]:
    """Keys valid beside `dotted` (the same level of the schema)."""
    parent = dotted.rpartition(".")[0]
    node = OmegaConf.select(schema, parent) if parent else schema
    prefix = f"{parent}." if parent else ""
    return [prefix + k for k in node.keys()] if isinstance(node, DictConfig) else []


def _explain(e: OmegaConfBaseException, schema: DictConfig, origin: str) -> SlmError:
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


def _yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """[(file, its yaml)] from the root `base:` down to `path`."""
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
    base = node.get("base")
    chain = _yaml_chain(path.parent / base, (*seen, path)) if base else []
    return [*chain, (path, node)]


def load_config(paths: str | Path | Sequence[str | Path], overrides: Sequence[str] = ()) -> TrainConfig:
    """Merge the yamls left to right (each with its own `base:` chain), then the `key=value` overrides, into the
    schema, and check every value; an error names the file or override that set the key.

    run_name defaults to the yamls' stems joined by '+'; `configs` records the files merged.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise SlmError("no config file given: name at least one yaml")
    schema = OmegaConf.structured(TrainConfig)
    cfg = schema.copy()
    origins: dict[str, str] = {}
    for file, node in (link for path in paths for link in _yaml_chain(path)):
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as e:
            raise _explain(e, schema, str(file)) from e
        origins.update(dict.fromkeys(_leaves(node), str(file)))
    for item in overrides:
        if "=" not in item:
            raise SlmError(f"override '{item}' is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _explain(e, schema, f"the command line ({item})") from e
        origins[item.partition("=")[0].strip()] = f"the command line ({item})"
    cfg.base = None
    cfg.run_name = cfg.run_name or "+".join(p.stem for p in paths)
    cfg.configs = [str(p) for p in paths]
    config: TrainConfig = OmegaConf.to_object(cfg)
    check(config, origins=origins)
    return config


def save_config(cfg: TrainConfig, path: Path) -> None:
    """The resolved config as yaml (what `load_config` of that file gives back)."""
    write_atomically(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
