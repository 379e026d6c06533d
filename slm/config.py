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
from collections.abc import Callable
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
    return None if value is not None else f"config key '{key}' is not set: give the folder of the MDS shards"


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
    if "class" in value:
        return None
    return f"config key '{key}.class' is not set: use llama, mamba, mamba2 or a transformers class"


def hub_repo(key: str, value: Any, owner: Any) -> str | None:
    if value is None or HUB_REPO.fullmatch(value):
        return None
    return f"config key '{key}' = '{value}' is not a Hub repo id: use ORG/NAME"


@dataclass
class DataSplit:
    local: str | None = ruled(None, shard_folder)  # folder of MDS shards, or the local cache of `remote`
    remote: str | None = None  # hf://datasets/ORG/REPO/PATH, s3://..., or None


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


@dataclass
class SchedulerConfig:
    warmup: str = ruled("1000ba", a_time)  # linear warmup, then cosine to alpha_f * lr at max_duration
    alpha_f: float = 0.0


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
    model: dict[str, Any] = ruled(rule=model_class, factory=dict)  # `class` plus kwargs of the transformers config
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def folder(self) -> Path:
        """The run folder: checkpoints, metrics.jsonl, run.json, config.yaml."""
        return Path(self.save_folder.format(run_name=self.run_name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check(node: Any, prefix: str = "") -> None:
    """Apply every field's rule, depth first in field order; the first problem is raised."""
    for f in dataclasses.fields(node):
        key, value = prefix + f.name, getattr(node, f.name)
        rule = f.metadata.get("rule")
        problem = rule(key, value, node) if rule else None
        if problem:
            raise SlmError(problem)
        if dataclasses.is_dataclass(value):
            check(value, f"{key}.")


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


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Merge the yaml chain of `path` and the `key=value` overrides into the schema, then check every value."""
    schema = OmegaConf.structured(TrainConfig)
    cfg = schema.copy()
    for file, node in _yaml_chain(Path(path)):
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as e:
            raise _explain(e, schema, str(file)) from e
    for item in overrides:
        if "=" not in item:
            raise SlmError(f"override '{item}' is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _explain(e, schema, f"the command line ({item})") from e
    cfg.base = None
    cfg.run_name = cfg.run_name or Path(path).stem
    config: TrainConfig = OmegaConf.to_object(cfg)
    check(config)
    return config


def save_config(cfg: TrainConfig, path: Path) -> None:
    """The resolved config as yaml (what `load_config` of that file gives back)."""
    write_atomically(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
