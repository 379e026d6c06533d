"""The Composer model: any causal LM transformers knows, built from `model.class` plus kwargs.

`model.class` is a transformers `model_type` (`llama`, `mamba`, `mamba2`, `gpt2`, `gpt_neox`, `opt`,
`qwen2`, ...) or a class name (`GPT2LMHeadModel`, `LlamaForCausalLM`, `Qwen2Config`), resolved through
transformers' own tables (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, CONFIG_MAPPING_NAMES): whatever
`AutoModelForCausalLM` can build, and nothing else. The other keys go to its config class, under their
own names or the config's aliases (gpt2's `n_embd` or `hidden_size`); unknown ones are refused. Mamba runs
HF's pure-PyTorch path with the `mambapy` parallel scan when the CUDA kernels (`mamba-ssm`,
`causal-conv1d`) are not importable.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from composer.core import Callback, State
from composer.loggers import Logger
from composer.models import HuggingFaceModel
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL_LM_NAMES
from transformers.pytorch_utils import Conv1D

from slm.core.errors import Refused, SlmError, say
from slm.core.foreign import checked_folder


def mamba_kernels_available() -> bool:
    """Return whether mamba's CUDA kernels (mamba_ssm, causal_conv1d) can run here."""
    return (torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm") is not None
            and importlib.util.find_spec("causal_conv1d") is not None)


def _causal_class_name(name: str) -> str | None:
    """Return the transformers causal-LM class name for a model_type, a causal-LM class name or a config class name."""
    if name.lower() in CAUSAL_LM_NAMES:  # a model_type: llama, gpt2, gpt_neox, ...
        return CAUSAL_LM_NAMES[name.lower()]
    if name in CAUSAL_LM_NAMES.values():  # GPT2LMHeadModel, LlamaForCausalLM, ...
        return name
    model_types = [t for t, config in CONFIG_MAPPING_NAMES.items() if config == name]  # Qwen2Config, ...
    return next((CAUSAL_LM_NAMES[t] for t in model_types if t in CAUSAL_LM_NAMES), None)


def _model_type_of(name: str) -> str | None:
    """Return the model_type of a transformers model or config class name (BertForMaskedLM: bert), else None."""
    cls = getattr(transformers, name, None) if name[:1].isupper() else None
    return getattr(getattr(cls, "config_class", cls), "model_type", None)


def resolve_class(name: str) -> type[PreTrainedModel]:
    """Resolve the causal-LM class `model.class` names; anything else is refused with the closest causal name."""
    full = _causal_class_name(name)
    cls = getattr(transformers, full, None) if full else None
    if cls is None:
        family = _model_type_of(name) or (name.lower() if name.lower() in CONFIG_MAPPING_NAMES else None)
        if family:  # a transformers name, but no causal LM: BertForMaskedLM hints BertLMHeadModel, t5 nothing
            problem = f"model class '{name}' is not a causal LM in transformers"
            close = [CAUSAL_LM_NAMES[family]] if family in CAUSAL_LM_NAMES else []
        else:
            known = sorted(CAUSAL_LM_NAMES) + sorted(CAUSAL_LM_NAMES.values())
            problem = f"unknown model class '{name}'"
            close = difflib.get_close_matches(name, known, n=1) or difflib.get_close_matches(name.lower(), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SlmError(f"{problem}: use a causal LM's model_type (llama, mamba, gpt2, gpt_neox, "
                       f"...) or class name (LlamaForCausalLM, GPT2LMHeadModel, ...){hint}")
    return cls


MAX_LAYERS = 2**16  # layers of a model config read from elsewhere: far past any causal LM's (each is built)

# transformers 5 folds these into one `rope_parameters` argument, and still takes them as keywords (a config.json
# written by transformers 4 has them): RotaryEmbeddingConfigMixin.convert_rope_params_to_dict.
ROPE_KEYWORDS = {"rope_theta", "rope_scaling", "partial_rotary_factor"}


def _config_keys(config_class: type[PretrainedConfig]) -> set[str]:
    """Return the keywords a config class takes: its own and PretrainedConfig's, its attribute_map's, and the rope
    keywords where it takes `rope_parameters`."""
    keys = set(inspect.signature(config_class.__init__).parameters)
    keys |= set(inspect.signature(PretrainedConfig.__init__).parameters)
    keys |= set(getattr(config_class, "attribute_map", {}))
    if "rope_parameters" in keys:
        keys |= ROPE_KEYWORDS
    return keys - {"self", "kwargs"}


def with_transformers_4_rope_keys(config: dict[str, Any]) -> dict[str, Any]:
    """Return a config.json dict that transformers 4 reads with the same rope as transformers 5 does.

    transformers 5 writes only `rope_parameters`, which transformers 4 ignores: it would rebuild the rotary
    embedding with its default theta, silently. Adding `rope_theta` and `rope_scaling` beside it keeps both
    readers right (transformers 5 takes `rope_parameters` first)."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return config
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {**config, "rope_theta": rope["rope_theta"],
            "rope_scaling": None if scaling.get("rope_type", "default") == "default" else scaling}


def config_value(config: PretrainedConfig, key: str) -> Any:
    """Read `config.key`, also for a rope keyword that transformers 5 keeps inside `config.rope_parameters`."""
    value = getattr(config, key, None)
    if value is None and key in ROPE_KEYWORDS:
        value = (getattr(config, "rope_parameters", None) or {}).get(key)
    return value


def build_config(model_cfg: dict[str, Any]) -> PretrainedConfig:
    """Build the transformers config for `model_cfg` (`class` plus kwargs), refusing unknown kwargs."""
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


def _first_line(e: BaseException) -> str:
    """Return the first line of an error's message, or its type's name where it has none."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def pretrained_config(source: str, what: str) -> PretrainedConfig:
    """Read the config of a save_pretrained folder or Hub id (maybe from elsewhere): a local folder checked first
    (nothing in it leads outside it: slm/core/foreign.py), none of its own code run (trust_remote_code=False)."""
    if Path(source).is_dir():
        checked_folder(source, "model folder")
    try:
        return transformers.AutoConfig.from_pretrained(source, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever a config from elsewhere makes transformers raise
        raise SlmError(f"cannot load {what} {source}: {_first_line(e)}") from e


def _tensor_bytes(model: torch.nn.Module) -> int:
    """Return the bytes the model's state dict tensors take (on the meta device too, where nothing is allocated)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def load_pretrained(source: str, what: str) -> PreTrainedModel:
    """Load the causal LM of a save_pretrained folder or Hub id (maybe from elsewhere): safetensors only, none of its
    own code (trust_remote_code=False); a local folder's config is built on the meta device first, and one that would
    take more than twice the bytes of its weights files (tied weights are stored once) is refused before anything is
    allocated. `what` names it in an error line."""
    config = pretrained_config(source, what)
    folder = Path(source)
    if folder.is_dir():
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        layers = getattr(config, "num_hidden_layers", 0)
        if not isinstance(layers, int) or not 0 <= layers <= MAX_LAYERS:
            raise SlmError(f"cannot load {what} {source}: its config has {layers!r} layers")
        try:
            with torch.device("meta"):
                needed = _tensor_bytes(transformers.AutoModelForCausalLM.from_config(config))
        except Exception as e:  # noqa: BLE001 - whatever a config from elsewhere makes transformers raise
            raise SlmError(f"cannot load {what} {source}: {type(e).__name__}: {_first_line(e)}") from e
        if weights and needed > 2 * weights + 2**20:
            raise Refused(f"cannot load {what} {source}: its config.json makes a model of {needed:,} bytes, and its "
                          f"weights files hold {weights:,}: refused before allocating it (docs/security.md)")
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(source, config=config, use_safetensors=True,
                                                                 trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever a folder from elsewhere makes transformers raise
        raise SlmError(f"cannot load {what} {source}: {_first_line(e)}") from e


def model_of_weights(model_cfg: dict[str, Any], weights: dict[str, torch.Tensor], where: str) -> PreTrainedModel:
    """Build the model a run's model config describes (a checkpoint's, maybe from elsewhere) holding `weights`: built
    on the meta device first and its tensors' names and shapes compared with the weights', so a config that does not
    fit them, or would allocate more than they hold, is refused before anything is allocated. A run started from
    `model.pretrained` takes its architecture from that model's config.json (its weights are the checkpoint's)."""
    if model_cfg.get("pretrained"):
        config = pretrained_config(str(model_cfg["pretrained"]), "the model.pretrained of")
        cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]  # noqa: SLF001 - its class for it
    else:
        config, cls = build_config(model_cfg), resolve_class(str(model_cfg["class"]))
    layers = getattr(config, "num_hidden_layers", 0)
    if not isinstance(layers, int) or not 0 <= layers <= len(weights):
        raise SlmError(f"{where}: its model config has {layers!r} layers and its weights {len(weights)} tensors: it "
                       "does not fit them")
    try:
        with torch.device("meta"):
            shapes = {name: tuple(t.shape) for name, t in cls(config).state_dict().items()}
    except Exception as e:  # noqa: BLE001 - whatever a config from elsewhere makes transformers raise
        raise SlmError(f"{where}: its model config builds no model ({type(e).__name__}: {_first_line(e)})") from e
    given = {name: tuple(t.shape) for name, t in weights.items()}
    for name in sorted(shapes.keys() | given.keys()):
        if shapes.get(name) != given.get(name):
            raise SlmError(f"{where}: its model config does not fit its weights ({name}: {shapes.get(name, 'absent')} "
                           f"in the config, {given.get(name, 'absent')} in the weights)")
    model = cls(config)
    model.load_state_dict(weights)
    return model


def pretrained_model(model_cfg: dict[str, Any]) -> PreTrainedModel:
    """Load `model.pretrained` (a folder or Hub id) with `AutoModelForCausalLM`; any other model key must agree
    with its config (the suite's `vocab_size` from base.yaml, say), since the weights fix the architecture."""
    source = str(model_cfg["pretrained"])
    model = load_pretrained(source, "model.pretrained")
    for key, value in model_cfg.items():
        if key == "class":
            if resolve_class(str(value)) is not type(model):
                raise SlmError(f"model.class {value} is not the class of model.pretrained {source} "
                               f"({type(model).__name__}): drop model.class")
        elif key != "pretrained" and config_value(model.config, key) != value:
            raise SlmError(f"model.{key} = {value} but model.pretrained {source} has "
                           f"{config_value(model.config, key)}: drop model.{key} (the weights decide it)")
    return model


def build_hf_model(model_cfg: dict[str, Any], seed: int) -> PreTrainedModel:
    """Build a freshly initialised model (the same seed gives the same weights), or `model.pretrained`'s."""
    if model_cfg.get("pretrained"):
        return pretrained_model(model_cfg)
    config = build_config(model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return resolve_class(str(model_cfg["class"]))(config)


def use_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Set the tokenizer's bos/eos/pad ids on the model's config and generation config, so HF tooling
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
    """Count unique parameters, embeddings included (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def context_length(config: PretrainedConfig) -> int | None:
    """Return the longest sequence a model takes: `max_position_embeddings`, read through the config's aliases
    (gpt2's `n_positions`), or None where there is no limit (mamba, bloom's ALiBi, xlnet's -1)."""
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Count training FLOPs (forward + backward = 3x forward) per token, for any model type.

    Matmuls: 2 FLOPs per weight of every Linear layer and every transformers Conv1D (gpt2's
    transposed Linear), the LM head included, embedding lookups excluded. A model whose config has
    attention heads (`num_attention_heads`, under any alias: gpt2's `n_head`) adds attention scores
    and values, 2 * 2 * seq_len * hidden per layer (every layer counted as full attention: hybrid
    or sliding-window models are over-counted). Mamba and Mamba2 add their depthwise conv
    (2 * d_inner * kernel) and selective scan (9 * d_inner * state, as in the Mamba paper) per layer.
    Norms, activations, rotary embeddings and softmax are not counted.
    """
    c = model.config
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    forward = 2.0 * matmul
    if c.model_type in ("mamba", "mamba2"):
        d_inner = c.expand * c.hidden_size
        forward += c.num_hidden_layers * (2.0 * d_inner * c.conv_kernel + 9.0 * d_inner * c.state_size)
    elif getattr(c, "num_attention_heads", None) and getattr(c, "hidden_size", None):
        forward += c.num_hidden_layers * 4.0 * seq_len * c.hidden_size
    return 3.0 * forward


class CausalLM(HuggingFaceModel):
    """Composer's HuggingFaceModel over a causal LM, with FLOPs for SpeedMonitor's MFU."""

    def __init__(self, model: PreTrainedModel, tokenizer=None, metrics=None, eval_metrics=None):
        super().__init__(model, tokenizer=tokenizer, use_logits=True, metrics=metrics, eval_metrics=eval_metrics,
                         shift_labels=True)
        self._flops_per_token: dict[int, float] = {}

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return the loss the forward computed, without Composer's look at `config.use_return_dict`."""
        return outputs["loss"]  # Composer's asks `config.use_return_dict`, deprecated in transformers 5

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs=None) -> dict[str, torch.Tensor]:
        """Compute the logits plus the mean loss over the (shifted) targets, for the metrics to share.

        In training `outputs` holds the forward's own loss; in evaluation it is computed once here. The labels are
        popped into `self.labels` and shifted as Composer's HuggingFaceModel.eval_forward does (the metrics read
        them there), without its `config.use_return_dict`.
        """
        self.labels = batch.pop("labels")
        self.labels[:, :-1] = self.labels[:, 1:].clone()  # HF causal LMs shift inside; the metrics need it here
        self.labels[:, -1] = -100
        # The class's forward, eager: with `compile: true` Composer puts a compiled one on the instance, which a
        # call without gradients would compile again.
        logits = (outputs if outputs else type(self).forward(self, batch))["logits"]
        if outputs is not None and outputs.get("loss") is not None:
            loss = outputs["loss"]
        else:
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), self.labels.flatten(),
                                                     ignore_index=-100)
        return {"logits": logits, "loss": loss}

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        """Return a batch's FLOPs, which SpeedMonitor asks every batch; the count walks the modules, so it is kept per
        sequence length."""
        batch_size, seq_len = batch["input_ids"].shape
        if seq_len not in self._flops_per_token:
            self._flops_per_token[seq_len] = flops_per_token(self.model, seq_len)
        return self._flops_per_token[seq_len] * batch_size * seq_len


class CompileTime(Callback):
    """With `compile: true`, Composer hands the wrapper to `torch.compile`, so the model's forward and the loss it
    computes inside (the labels go in with the batch) and their backward run as compiled graphs; the graphs are
    built during the first batch of each start, which this says once, with its seconds. Evaluation calls the
    wrapper's eval_forward, eager, and the training loader drops its last short batch: nothing compiles again."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.said = False

    def before_forward(self, state: State, logger: Logger) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        if not self.said and self.start is not None:
            self.said = True
            say(f"compiled the model's forward, loss and backward in the first batch: "
                f"{time.perf_counter() - self.start:.1f} s")
