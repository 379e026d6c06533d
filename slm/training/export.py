"""Exporting a Composer checkpoint to a HuggingFace folder (`save_pretrained` + tokenizer + card).

The checkpoint carries the run's resolved config and tokenizer location (the RunInfo callback),
so the file alone is enough. The export loads with `AutoModelForCausalLM.from_pretrained(DIR)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from slm.core.errors import SlmError
from slm.core.foreign import count, mapping
from slm.core.paths import partial_folder, refuse_secrets, refuse_to_clobber
from slm.core.run_folder import check_run_record
from slm.core.trust import unpickle_checkpoint
from slm.data.loading import describe_split
from slm.data.tokenizer import load_tokenizer, tokenizer_matches
from slm.hub.manifest import file_record, weights_digest
from slm.training.model import (
    context_length,
    count_parameters,
    model_of_weights,
    use_special_tokens,
    with_transformers_4_rope_keys,
)


def read_checkpoint(path: Path) -> dict:
    """Read the Composer state of a checkpoint file written by slm/train.py (maybe someone else's: through the gate of
    slm/core/trust.py), the fields slm reads from it checked: its timestamp's counts and its run record."""
    state = mapping(mapping(unpickle_checkpoint(path), str(path)).get("state"), f"{path}: state")
    callbacks = mapping(state.get("callbacks") or {}, f"{path}: callbacks")
    if "RunInfo" not in callbacks:
        raise SlmError(f"{path} was not written by slm/train.py (it carries no run config)")
    info = check_run_record(callbacks["RunInfo"], f"{path}: its run record")
    mapping(info.get("config"), f"{path}: its run record's config")
    timestamp = mapping(mapping(state.get("timestamp"), f"{path}: timestamp").get("Timestamp"), f"{path}: timestamp")
    for key in ("epoch", "batch", "sample", "token"):
        count(timestamp.get(key), f"{path}: timestamp.{key}")
    return state


def model_from_checkpoint(state: dict, where: str = "the checkpoint") -> torch.nn.Module:
    """Build the transformers model of a checkpoint's state (`read_checkpoint`), weights loaded (`where` names the
    checkpoint in an error line)."""
    model_cfg = mapping(state["callbacks"]["RunInfo"]["config"].get("model"), f"{where}: config.model")
    weights = {k.removeprefix("model."): v for k, v in mapping(state.get("model"), f"{where}: model").items()}
    return model_of_weights(model_cfg, weights, where).eval()


def _metrics_table(metrics: dict) -> str:
    """Tabulate the newest logged value of each train and eval metric (as of the checkpoint's batch)."""
    rows = [f"| {key} | {value:.4g} |" for key, value in sorted(metrics.items())
            if key.startswith(("loss/", "metrics/")) and isinstance(value, float)]
    if not rows:
        return "No metrics were logged before this checkpoint."
    return "| metric (newest value) | |\n|---|---|\n" + "\n".join(rows)


def _origin(info: dict) -> str:
    """Describe where the run's weights started: a fresh initialisation, a pretrained model, or another run's
    checkpoint."""
    warm, pretrained = info.get("warm_start"), info["config"]["model"].get("pretrained")
    if warm:
        kind = "its weights" if warm["weights_only"] else "its whole training state"
        revision = f" @ {warm['revision']}" if warm.get("revision") else ""
        at = f" at batch {warm['batch']}" if warm.get("batch") is not None else ""
        return f"branched off `{warm['path']}`{revision}{at} ({kind})"
    return f"the pretrained model `{pretrained}`" if pretrained else f"initialised with seed {info['config']['seed']}"


def _model_card(info: dict, state: dict, params: int, checkpoint: Path, model_type: str) -> str:
    """Return the export's README.md: a model card with the run's origin, data, tokenizer, hardware, metrics, config."""
    cfg = info["config"]
    ts = state["timestamp"]["Timestamp"]
    start = (info.get("starts") or [{}])[-1]
    hardware = start.get("hardware", {})
    return f"""---
library_name: transformers
tags: [slm, {model_type}]
---
# {cfg['run_name']} at batch {ts['batch']}

A {params:,}-parameter {model_type} trained with slm (MosaicML Composer + Streaming),
exported from `{checkpoint.name}`.

| | |
|---|---|
| architecture | {cfg['model'].get('class') or model_type} |
| weights from | {_origin(info)} |
| parameters (embeddings included) | {params:,} |
| batches / samples / tokens seen | {ts['batch']:,} / {ts['sample']:,} / {ts['token']:,} |
| data | {describe_split(cfg['data']['train'])} |
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
    """Write `out_dir` with the model, its tokenizer, a model card and slm-run.json (the run's config and history,
    the checkpoint's sha256 and timestamp, and the weights digest of slm/hub/manifest.py)."""
    refuse_to_clobber(out_dir, overwrite)
    state = read_checkpoint(checkpoint)
    info = state["callbacks"]["RunInfo"]
    refuse_secrets(info, f"the run record in {checkpoint}")  # written into the model card and slm-run.json
    model = model_from_checkpoint(state, str(checkpoint))
    tokenizer = load_tokenizer(info["tokenizer"])
    if info.get("tokenizer_hash") and not tokenizer_matches(tokenizer, {"content_hash": info["tokenizer_hash"]}):
        raise SlmError(f"tokenizer {info['tokenizer']} is not the one the run of {checkpoint} trained with (content "
                       "hashes differ): the export would ship another tokenizer; put the run's tokenizer there")
    use_special_tokens(model, tokenizer)
    if context_length(model.config) is not None:  # llama, gpt2, ... have a context limit; mamba has none
        tokenizer.model_max_length = context_length(model.config)
    # Trained on input_ids alone: `model(**tokenizer(text))` must not pass token_type_ids, which gpt2 would add
    # as embeddings (of token 0) and gpt_neox's generate() refuses.
    names = [name for name in tokenizer.model_input_names if name != "token_type_ids"]
    tokenizer.model_input_names = tokenizer.init_kwargs["model_input_names"] = names
    try:
        with partial_folder(out_dir) as partial:
            model.save_pretrained(partial)
            config = partial / "config.json"
            config.write_text(json.dumps(with_transformers_4_rope_keys(json.loads(config.read_text())), indent=2,
                                         sort_keys=True) + "\n")
            tokenizer.save_pretrained(partial)
            (partial / "README.md").write_text(_model_card(info, state, count_parameters(model), checkpoint,
                                                                    model.config.model_type))
            timestamp = {k: v for k, v in state["timestamp"]["Timestamp"].items() if isinstance(v, int)}
            run = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_record(checkpoint)["sha256"],
                   "weights_sha256": weights_digest(model.state_dict()), "timestamp": timestamp, **info}
            (partial / "slm-run.json").write_text(json.dumps(run, indent=2) + "\n")
    except OSError as e:
        raise SlmError(f"cannot write {out_dir}: {e.strerror or e}") from e
    return out_dir
