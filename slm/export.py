"""Exporting a Composer checkpoint to a HuggingFace folder (`save_pretrained` + tokenizer + card).

The checkpoint carries the run's resolved config and tokenizer location (the RunInfo callback),
so the file alone is enough. The export loads with `AutoModelForCausalLM.from_pretrained(DIR)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from slm.errors import SlmError
from slm.model import build_hf_model, count_parameters, use_special_tokens
from slm.paths import partial_folder, refuse_to_clobber
from slm.tokenizer import load_tokenizer


def read_checkpoint(path: Path) -> dict:
    """The Composer state of a checkpoint file written by slm/train.py."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)["state"]
    except FileNotFoundError:
        raise SlmError(f"checkpoint not found: {path}") from None  # the cause adds nothing
    except Exception as e:  # a torn or foreign file
        raise SlmError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from e
    if "RunInfo" not in state.get("callbacks", {}):
        raise SlmError(f"{path} was not written by slm/train.py (it carries no run config)")
    return state


def model_from_checkpoint(state: dict) -> torch.nn.Module:
    """The transformers model of a checkpoint, weights loaded."""
    model = build_hf_model(state["callbacks"]["RunInfo"]["config"]["model"], seed=0)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["model"].items()})
    return model.eval()


def _metrics_table(metrics: dict) -> str:
    """The newest logged value of each train and eval metric (as of the checkpoint's batch)."""
    rows = [f"| {key} | {value:.4g} |" for key, value in sorted(metrics.items())
            if key.startswith(("loss/", "metrics/")) and isinstance(value, float)]
    if not rows:
        return "No metrics were logged before this checkpoint."
    return "| metric (newest value) | |\n|---|---|\n" + "\n".join(rows)


def _model_card(info: dict, state: dict, params: int, checkpoint: Path) -> str:
    cfg = info["config"]
    ts = state["timestamp"]["Timestamp"]
    start = (info.get("starts") or [{}])[-1]
    hardware = start.get("hardware", {})
    return f"""---
library_name: transformers
tags: [slm, {cfg['model']['class']}]
---
# {cfg['run_name']} at batch {ts['batch']}

A {params:,}-parameter {cfg['model']['class']} trained with slm (MosaicML Composer + Streaming),
exported from `{checkpoint.name}`.

| | |
|---|---|
| architecture | {cfg['model']['class']} |
| parameters (embeddings included) | {params:,} |
| batches / samples / tokens seen | {ts['batch']:,} / {ts['sample']:,} / {ts['token']:,} |
| data | {cfg['data']['train']['remote'] or cfg['data']['train']['local']} |
| tokenizer | {info['tokenizer']} |
| seed / data-order seed | {cfg['seed']} / {cfg['data']['shuffle_seed']} |
| slm commit | {start.get('git_commit')} |
| trained on | {hardware.get('processes')} process(es); {hardware.get('gpu_count')} x {hardware.get('gpu')}; \
{hardware.get('cpu')} |

## Metrics

{_metrics_table(info.get('metrics', {}))}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")
tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_REPO")
```

## Training config

```yaml
{OmegaConf.to_yaml(OmegaConf.create(cfg)).rstrip()}
```
"""


def export_checkpoint(checkpoint: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Write `out_dir` with the model, its tokenizer, a model card and slm-run.json."""
    refuse_to_clobber(out_dir, overwrite)
    state = read_checkpoint(checkpoint)
    info = state["callbacks"]["RunInfo"]
    model = model_from_checkpoint(state)
    tokenizer = load_tokenizer(info["tokenizer"])
    use_special_tokens(model, tokenizer)
    if hasattr(model.config, "max_position_embeddings"):  # llama has a context limit; mamba has none
        tokenizer.model_max_length = model.config.max_position_embeddings
    try:
        with partial_folder(out_dir) as partial:
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            (partial / "README.md").write_text(_model_card(info, state, count_parameters(model), checkpoint))
            timestamp = {k: v for k, v in state["timestamp"]["Timestamp"].items() if isinstance(v, int)}
            run = {"checkpoint": str(checkpoint), "timestamp": timestamp, **info}
            (partial / "slm-run.json").write_text(json.dumps(run, indent=2) + "\n")
    except OSError as e:
        raise SlmError(f"cannot write {out_dir}: {e.strerror or e}") from e
    return out_dir
