"""`model.class`: any causal LM transformers knows, by model_type or class name, trained and exported."""

import json

import pytest
import torch
import transformers

from slm.core.errors import SlmError
from slm.training.export import model_from_checkpoint
from slm.training.model import (
    build_config,
    build_hf_model,
    context_length,
    flops_per_token,
    resolve_class,
    use_special_tokens,
)

from helpers import final_state, run_slm, train, write_yaml

TINY = {  # hidden 32, one layer, two heads, vocab 512, 64 positions: the session shards' sizes
    "gpt2": {"vocab_size": 512, "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64},
    "gpt_neox": {"vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "intermediate_size": 64, "max_position_embeddings": 64},
}


@pytest.mark.stack
@pytest.mark.parametrize("name, cls", [("gpt2", "GPT2LMHeadModel"), ("gpt_neox", "GPTNeoXForCausalLM"),
                                       ("opt", "OPTForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                       ("llama", "LlamaForCausalLM"), ("mamba2", "Mamba2ForCausalLM"),
                                       ("GPT2LMHeadModel", "GPT2LMHeadModel"), ("Qwen2Config", "Qwen2ForCausalLM"),
                                       ("LlamaForCausalLM", "LlamaForCausalLM")])
def test_model_types_and_class_names_resolve(name, cls):
    assert resolve_class(name).__name__ == cls


@pytest.mark.stack
@pytest.mark.parametrize("name, message", [
    ("gtp2", "unknown model class 'gtp2': use a causal LM's model_type (llama, mamba, gpt2, gpt_neox, ...) or "
             "class name (LlamaForCausalLM, GPT2LMHeadModel, ...); did you mean 'gpt2'?"),
    ("LLamaForCausalLM", "unknown model class 'LLamaForCausalLM': "),
    ("BertForMaskedLM", "model class 'BertForMaskedLM' is not a causal LM in transformers: "),
    ("t5", "model class 't5' is not a causal LM in transformers: "),
])
def test_other_names_are_refused_in_one_line(name, message):
    with pytest.raises(SlmError) as e:
        resolve_class(name)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    if name == "LLamaForCausalLM":
        assert str(e.value).endswith("did you mean 'LlamaForCausalLM'?")
    if name == "BertForMaskedLM":  # its own family's causal LM
        assert str(e.value).endswith("did you mean 'BertLMHeadModel'?")


@pytest.mark.stack
def test_config_kwargs_by_their_own_names_or_aliases():
    own = build_config({"class": "gpt2", **TINY["gpt2"]})
    alias = build_config({"class": "gpt2", "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "max_position_embeddings": 64})
    assert (own.n_embd, own.n_layer, own.n_head, own.n_positions) == (alias.n_embd, alias.n_layer, alias.n_head,
                                                                      alias.n_positions) == (32, 1, 2, 64)
    with pytest.raises(SlmError, match=r"^unknown config key 'model.n_layr' for GPT2Config; "
                                       r"did you mean 'model.n_layer'\?$"):
        build_config({"class": "gpt2", "n_layr": 1})
    with pytest.raises(SlmError, match=r"^unknown config key 'model.n_embd' for GPTNeoXConfig"):
        build_config({"class": "gpt_neox", "n_embd": 32})


@pytest.mark.stack
@pytest.mark.parametrize("kind, limit", [("gpt2", 64), ("gpt_neox", 64), ("opt", 64), ("mamba", None)])
def test_context_length_under_any_name(kind, limit):
    kwargs = {"gpt2": {"n_positions": 64}, "mamba": {}}.get(kind, {"max_position_embeddings": 64})
    assert context_length(build_config({"class": kind, **kwargs})) == limit


@pytest.mark.stack
def test_generic_flops_for_gpt2_count_its_conv1d_weights():
    model = build_hf_model({"class": "gpt2", **TINY["gpt2"]}, seed=0)
    h, layers, vocab, seq_len = 32, 1, 512, 10
    per_layer = 3 * h * h + h * h + 4 * h * h + 4 * h * h  # c_attn (qkv), attn c_proj, mlp c_fc, mlp c_proj
    forward = 2 * (layers * per_layer + vocab * h) + layers * 2 * 2 * seq_len * h  # + the LM head; + attention
    assert flops_per_token(model, seq_len) == 3 * forward


@pytest.mark.stack
def test_special_tokens_reach_gpt2s_configs():
    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 0, 1, None

    model = build_hf_model({"class": "gpt2", **TINY["gpt2"]}, seed=0)
    use_special_tokens(model, Tok())
    for config in (model.config, model.generation_config):
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 1, 1)


@pytest.fixture(scope="module", params=sorted(TINY))
def exported(request, tmp_path_factory, shards):
    """A tiny model of the type trained 8 batches by slm/train.py, and `slm export` of its last checkpoint."""
    root = tmp_path_factory.mktemp(request.param)
    config = write_yaml(root / "run.yaml", shards, base="base.yaml")
    lines = config.read_text().splitlines()
    lines = lines[: lines.index("model:") + 1] + [f"  class: {request.param}"]
    config.write_text("\n".join(lines + [f"  {k}: {v}" for k, v in TINY[request.param].items()]) + "\n")
    train(config, "run_name=mt", "max_duration=8ba", "eval_interval=8ba", "save_interval=8ba", "early_checkpoints=0")
    run_slm("export", str(root / "ckpt" / "mt" / "latest-rank0.pt"), "-o", str(root / "hf"))
    return request.param, root


@pytest.mark.train
def test_trained_model_type_exports_and_loads(exported, tokenizer_dir):
    kind, root = exported
    state = final_state(root / "ckpt" / "mt")
    assert state["timestamp"]["Timestamp"]["batch"] == 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    assert hf.config.model_type == kind
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, model_from_checkpoint(state)(input_ids=ids).logits)
    tok = transformers.AutoTokenizer.from_pretrained(root / "hf")
    config = json.loads((root / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.model_max_length == context_length(hf.config) == 64
    inputs = tok("Once upon a time", return_tensors="pt")  # input_ids and attention_mask, as in training
    assert set(inputs) == {"input_ids", "attention_mask"}
    out = hf.generate(**inputs, min_new_tokens=3, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    pipe = transformers.pipeline("text-generation", model=hf, tokenizer=tok)
    assert pipe("Once upon a time", max_new_tokens=5, do_sample=False)[0]["generated_text"].startswith("Once")
    assert f"[slm, {kind}]" in (root / "hf" / "README.md").read_text()
