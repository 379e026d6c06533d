"""The Composer model: any transformers `*ForCausalLM`, built from `model.class` plus kwargs.

`llama`, `mamba` and `mamba2` are short names; any other `XxxForCausalLM` (or `XxxConfig`)
class name of transformers works too. Mamba runs HF's pure-PyTorch path with the `mambapy`
parallel scan when the CUDA kernels (`mamba-ssm`, `causal-conv1d`) are not importable.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
from typing import Any

import torch
import transformers
from composer.models import HuggingFaceModel
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from slm.errors import SlmError

SHORT_NAMES = {"llama": "LlamaForCausalLM", "mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}


def mamba_kernels_available() -> bool:
    return (torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm") is not None
            and importlib.util.find_spec("causal_conv1d") is not None)


def resolve_class(name: str) -> type[PreTrainedModel]:
    full = SHORT_NAMES.get(name.lower(), name)
    if full.endswith("Config"):
        full = full[: -len("Config")] + "ForCausalLM"
    cls = getattr(transformers, full, None) if full.endswith("ForCausalLM") else None
    if cls is None:
        known = sorted(SHORT_NAMES) + [n for n in dir(transformers) if n.endswith("ForCausalLM")]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SlmError(f"unknown model class '{name}': use llama, mamba, mamba2 or a transformers "
                       f"*ForCausalLM class{hint}")
    return cls


def _config_keys(config_class: type[PretrainedConfig]) -> set[str]:
    keys = set(inspect.signature(config_class.__init__).parameters)
    keys |= set(inspect.signature(PretrainedConfig.__init__).parameters)
    keys |= set(getattr(config_class, "attribute_map", {}))
    return keys - {"self", "kwargs"}


def build_config(model_cfg: dict[str, Any]) -> PretrainedConfig:
    """The transformers config for `model_cfg` (`class` plus kwargs), refusing unknown kwargs."""
    kwargs = dict(model_cfg)
    cls = resolve_class(str(kwargs.pop("class")))
    config_class = cls.config_class
    valid = _config_keys(config_class)
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f"; did you mean 'model.{close[0]}'?" if close else ""
            raise SlmError(f"unknown config key 'model.{key}' for {config_class.__name__}{hint}")
    if config_class.model_type in ("mamba", "mamba2") and "use_mambapy" in valid:
        kwargs.setdefault("use_mambapy", not mamba_kernels_available())
    try:
        return config_class(**kwargs)
    except (TypeError, ValueError) as e:
        raise SlmError(f"bad model config for {config_class.__name__}: {e}") from e


def build_hf_model(model_cfg: dict[str, Any], seed: int) -> PreTrainedModel:
    """A freshly initialised model; the same seed gives the same weights."""
    config = build_config(model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return resolve_class(str(model_cfg["class"]))(config)


def use_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The tokenizer's bos/eos/pad ids on the model's config and generation config, so HF tooling
    (`pipeline`, `generate()`) stops at its `<eos>` instead of transformers' per-architecture defaults.

    Call it on a built model: LlamaModel takes `pad_token_id` as its embedding's padding_idx at
    construction, which would change the initialisation and the gradients of existing runs.
    Without a pad token, padding uses eos.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}
    for config in (model.config, model.generation_config):
        if config is not None:  # models that cannot generate have no generation config
            for key, value in ids.items():
                setattr(config, key, value)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters, embeddings included (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) per token.

    Matmuls: 2 FLOPs per weight of every Linear layer (the LM head included, embedding lookups
    excluded). Llama adds attention scores and values, 2 * 2 * seq_len * hidden per layer.
    Mamba adds its depthwise conv (2 * d_inner * kernel) and selective scan (9 * d_inner * state,
    as in the Mamba paper) per layer.
    """
    c = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    forward = 2.0 * linear
    if c.model_type == "llama":
        forward += c.num_hidden_layers * 4.0 * seq_len * c.hidden_size
    elif c.model_type in ("mamba", "mamba2"):
        d_inner = c.expand * c.hidden_size
        forward += c.num_hidden_layers * (2.0 * d_inner * c.conv_kernel + 9.0 * d_inner * c.state_size)
    return 3.0 * forward


class CausalLM(HuggingFaceModel):
    """Composer's HuggingFaceModel over a causal LM, with FLOPs for SpeedMonitor's MFU."""

    def __init__(self, model: PreTrainedModel, tokenizer=None, metrics=None, eval_metrics=None):
        super().__init__(model, tokenizer=tokenizer, use_logits=True, metrics=metrics, eval_metrics=eval_metrics,
                         shift_labels=True)
        self._flops_per_token: dict[int, float] = {}

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs=None) -> dict[str, torch.Tensor]:
        """Logits plus the mean loss over the (shifted) targets, for the metrics to share.

        In training `outputs` holds the forward's own loss; in evaluation it is computed once here.
        """
        logits = super().eval_forward(batch, outputs)  # pops the labels into self.labels, shifted
        if outputs is not None and outputs.get("loss") is not None:
            loss = outputs["loss"]
        else:
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), self.labels.flatten(),
                                                     ignore_index=-100)
        return {"logits": logits, "loss": loss}

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        """SpeedMonitor asks every batch; the count walks the modules, so it is kept per sequence length."""
        batch_size, seq_len = batch["input_ids"].shape
        if seq_len not in self._flops_per_token:
            self._flops_per_token[seq_len] = flops_per_token(self.model, seq_len)
        return self._flops_per_token[seq_len] * batch_size * seq_len
