"""docs/config.md, generated from the config schema (slm/core/config.py): every key with its type, its default and the
comments beside its declaration, then a table for people coming from delphi or llm-foundry.

    python -m slm.core.config_reference > docs/config.md      (or `make docs`; tests/test_docs.py fails when stale)
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
from typing import Any

from slm.core.config import DataSplit, StreamConfig, TrainConfig


def _comments(cls: type) -> tuple[str, dict[str, str]]:
    """Return a schema class's own comment (on its `class` line) and each field's: the comment lines right above the
    field and the comment at the end of its line, joined."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    node = ast.parse(source).body[0]
    docs = {}
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            above, line = [], item.lineno - 1
            while line >= 1 and lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            docs[item.target.id] = " ".join([*above, *filter(None, [comments.get(item.end_lineno)])])
    return comments.get(node.lineno, ""), docs


def _yaml_value(value: Any) -> str:
    """Return a default as yaml writes it: null for None, true or false for a bool, else its str."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def reference() -> str:
    """Return docs/config.md: every config key with its type, default and documentation, from the schema."""
    out = ["# Config reference", "",
           "Every key a training yaml may set, with its type, its default and what it does. Generated from the schema "
           "in `slm/core/config.py` (`python -m slm.core.config_reference > docs/config.md`, or `make docs`); a "
           "test fails when "
           "this page is out of date. `yamls/base.yaml` sets the suite's own choices over these defaults; "
           "docs/training.md shows them at work.", ""]

    def section(cls: type, prefix: str) -> None:
        about, docs = _comments(cls)
        title = f"## `{prefix.rstrip('.')}`" if prefix else "## Top level"
        out.extend([title, "", *([about[0].upper() + about[1:] + ".", ""] if about else []),
                    "| key | type | default | what it is |", "|---|---|---|---|"])
        nested = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                nested.append((type(default), f"{prefix}{f.name}."))
                continue
            kind = str(f.type).replace("|", "\\|")  # a table cell: GitHub's markdown splits at a bare |
            out.append(f"| `{prefix}{f.name}` | `{kind}` | `{_yaml_value(default)}` | {docs[f.name]} |")
        out.append("")
        seen = {}
        for kind, key in nested:  # splits of one kind share a table: data.{train,eval}
            seen.setdefault(kind, []).append(key)
        for kind, keys in seen.items():
            names = [k.rstrip(".").rpartition(".")[2] for k in keys]
            parent = keys[0].rstrip(".").rpartition(".")[0]
            shared = f"{parent}.{{{','.join(names)}}}." if len(keys) > 1 else keys[0]
            section(kind, shared.lstrip("."))
            if kind is DataSplit:
                section(StreamConfig, f"{shared}streams.NAME.")

    section(TrainConfig, "")
    return "\n".join(out).rstrip() + "\n\n" + COMING_FROM


COMING_FROM = """## Coming from delphi or llm-foundry

Their flags and keys, and slm's (`slm train CONFIG.yaml [key=value ...]`; a yaml, not a json, and nested keys written
with dots):

| delphi | llm-foundry | slm |
|---|---|---|
| `--overrides k=v ...` | `k=v` after the yaml | `k=v ...`, or `--overrides k=v ...` |
| `-v`, `-s`, `--loglevel LEVEL` | (`python_log_level`) | `-v`, `-s`, `--loglevel LEVEL` (Composer's and slm's) |
| `out_repo`, `""`: off | `save_folder: hf://...` | `hub.repo: ORG/NAME`, `""` or null: off |
| `wandb` (`project`, ...), off when empty | `loggers.wandb` | `logging.wandb.project`, ...; `""` or null: off |
| `run_name`, `out_dir` | `run_name`, `save_folder` | `run_name`, `save_folder` (`checkpoints/{run_name}`) |
| `init_from: resume` | `autoresume: true` | always: the same `run_name` resumes |
| `max_epochs` | `max_duration` | `max_duration` (`10ep`, `2000ba`, `5000000tok`) |
| `batch_size` x `gradient_accumulation_steps` | `global_train_batch_size` | `global_batch_size` |
| (`batch_size`) | `device_train_microbatch_size` | `device_microbatch_size` |
| `max_seq_len` | `max_seq_len` | the shards' `seq_len` (`slm tokenize -l`) |
| `eval_interval`, `eval_iters` | `eval_interval`, `eval_subset_num_batches` | `eval_interval`, `eval_batches` |
| `checkpoint_interval` | `save_interval` | `save_interval` (and `early_checkpoints`, `checkpoints_per_token_decade`) |
| `optimizer` (`lr`, `beta1`, `beta2`, `weight_decay`) | `optimizer` | `optimizer.lr`, `.betas`, `.weight_decay` |
| `grad_clip` | `algorithms.gradient_clipping` | `grad_clip` |
| `torch_seed`, `batch_ordering_seed` | `seed` | `seed`, `data.shuffle_seed` |
| `model_config` (`model_class` + kwargs) | `model` | `model` (`class` + the HF config's keys) |
| `dataset`, `tokenizer` | `train_loader`, `tokenizer` | `data.train`, `data.eval` (MDS folders), `tokenizer` |
"""


if __name__ == "__main__":
    print(reference(), end="")
