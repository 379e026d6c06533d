"""Training config: yaml files merged with OmegaConf into a typed schema.

A yaml may name its parent with `base: other.yaml` (relative to itself), so the suite's
shared defaults live once in `yamls/base.yaml`; `key=value` overrides from the command line
come last. An unknown or mistyped key fails with one line naming the key, where it came
from, and the closest valid key.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from slm.errors import SlmError

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class DataSplit:
    local: str = "???"  # folder of MDS shards, or the local cache of `remote`
    remote: str | None = None  # hf://datasets/ORG/REPO/PATH, s3://..., or None


@dataclass
class DataConfig:
    train: DataSplit = field(default_factory=DataSplit)
    eval: DataSplit = field(default_factory=DataSplit)
    shuffle: bool = True
    shuffle_seed: int = 1337  # the data order; independent of the init seed
    shuffle_algo: str = "py1e"
    num_canonical_nodes: int = 1  # fixed, so the sample order is the same on any number of nodes
    num_workers: int = 0


@dataclass
class OptimizerConfig:
    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    warmup: str = "1000ba"  # linear warmup, then cosine to alpha_f * lr at max_duration
    alpha_f: float = 0.0


@dataclass
class HubConfig:
    repo: str | None = None  # ORG/NAME model repo for checkpoints (created private if missing); None: local only
    private: bool = True
    export: bool = False  # also export every checkpoint in HF format to a branch named after it (ba400)
    retries: int = 5  # attempts per Hub call on transient errors (connection, 429, 5xx)
    retry_wait: float = 2.0  # seconds before the first retry; doubles each time


@dataclass
class WandbConfig:
    project: str | None = None  # set it to log to W&B (WANDB_MODE=offline works)
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    base: str | None = None  # parent yaml, consumed while loading
    run_name: str | None = None  # defaults to the yaml's stem; reuse it to resume
    seed: int = 42
    max_duration: str = "10ep"
    global_batch_size: int = 256
    device_microbatch_size: Any = None  # int, or "auto" (GPU only); None = the whole per-device batch
    precision: str | None = None  # None: fp32 on CPU, amp_bf16 on GPU
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    save_folder: str = "checkpoints/{run_name}"
    save_interval: str = "1000ba"
    early_checkpoints: int = 512  # also save at batches 1, 2, 4, ... up to this; 0 turns them off
    keep: int = -1  # keep the newest N periodic checkpoints (early ones always stay); -1 keeps all
    eval_interval: str = "500ba"
    eval_batches: int = -1  # batches per evaluation; -1 = the whole eval split
    log_interval: str = "10ba"
    tokenizer: str | None = None  # None: the tokenizer recorded in the train shards' slm-dataset.json
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)  # `class` plus kwargs of the transformers config
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


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
        raise SlmError(f"cannot parse {path}: {' '.join(str(e).split())}") from None
    if not isinstance(node, DictConfig):
        raise SlmError(f"{path} must hold a mapping of config keys, not a {type(node).__name__}")
    base = node.get("base")
    chain = _yaml_chain(path.parent / base, (*seen, path)) if base else []
    return [*chain, (path, node)]


def load_config(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Merge the yaml chain of `path` and the `key=value` overrides into the typed schema."""
    schema = OmegaConf.structured(TrainConfig)
    cfg = schema.copy()
    for file, node in _yaml_chain(Path(path)):
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as e:
            raise _explain(e, schema, str(file)) from None
    for item in overrides:
        if "=" not in item:
            raise SlmError(f"override '{item}' is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _explain(e, schema, f"the command line ({item})") from None
    cfg.base = None
    if cfg.run_name is None:
        cfg.run_name = Path(path).stem
    _check(cfg)
    return cfg


def _check(cfg: DictConfig) -> None:
    """Values that type-check but make no sense."""
    if not RUN_NAME.match(cfg.run_name) or ".." in cfg.run_name:
        raise SlmError(f"run_name '{cfg.run_name}' is not a safe folder name: use letters, digits and . _ + - "
                       "(no '/' or '..')")
    for key in ("data.train.local", "data.eval.local"):
        if OmegaConf.is_missing(cfg, key):
            raise SlmError(f"config key '{key}' is not set: give the folder of the MDS shards")
    if "class" not in cfg.model:
        raise SlmError("config key 'model.class' is not set: use llama, mamba, mamba2 or a transformers class")
    positive = {"global_batch_size": cfg.global_batch_size, "optimizer.lr": cfg.optimizer.lr}
    for key, value in positive.items():
        if value <= 0:
            raise SlmError(f"config key '{key}' must be positive, got {value}")
    mb = cfg.device_microbatch_size
    if not (mb is None or mb == "auto" or (isinstance(mb, int) and not isinstance(mb, bool) and mb > 0)):
        raise SlmError(f"config key 'device_microbatch_size' must be a positive integer or 'auto', got {mb!r}")
    if cfg.hub.repo is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.hub.repo):
        raise SlmError(f"config key 'hub.repo' = '{cfg.hub.repo}' is not a Hub repo id: use ORG/NAME")
    if cfg.hub.export and cfg.hub.repo is None:
        raise SlmError("config key 'hub.export' is true but 'hub.repo' is not set: name the repo to export to")
    if cfg.hub.retries < 1:
        raise SlmError(f"config key 'hub.retries' must be at least 1, got {cfg.hub.retries}")
    if cfg.keep == 0 or cfg.keep < -1:
        raise SlmError(f"config key 'keep' must be -1 (keep all) or a positive number, got {cfg.keep}")


def save_config(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
