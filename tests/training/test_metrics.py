import math

import torch
from transformers import AutoTokenizer

from slm.training.metrics import build_metrics, byte_lengths
from slm.training.model import CausalLM, build_hf_model, flops_per_token


def test_byte_table_counts_the_utf8_bytes_of_decoded_text(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    table = byte_lengths(tok)
    text = 'Once upon a time, Zoë said "hi" to 猫 🐱.\nThe end.'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert int(table[ids].sum()) == len(text.encode("utf-8"))
    assert table[tok.bos_token_id] == table[tok.eos_token_id] == table[tok.pad_token_id] == 0


def test_metrics_from_the_model_equal_a_direct_computation(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    table = byte_lengths(tok)
    hf = build_hf_model({"class": "llama", "vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1}, 0)
    model = CausalLM(hf, tok, metrics=build_metrics(table), eval_metrics=build_metrics(table))
    torch.manual_seed(0)
    ids = torch.randint(3, len(tok), (3, 9))
    with torch.no_grad():
        logits = hf(input_ids=ids).logits[:, :-1]
        targets = ids[:, 1:]
        for outputs in (None, model.forward({"input_ids": ids, "labels": ids.clone()})):  # eval, then train
            out = model.eval_forward({"input_ids": ids, "labels": ids.clone()}, outputs)
            metrics = {type(m).__name__: m for m in build_metrics(table)}
            for metric in metrics.values():
                metric.update(out, model.labels)
            nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
            n, n_bytes = targets.numel(), table[targets].sum().item()
            assert math.isclose(metrics["CrossEntropy"].compute().item(), nats.item() / n, rel_tol=1e-5)
            assert math.isclose(metrics["Perplexity"].compute().item(), math.exp(nats.item() / n), rel_tol=1e-5)
            assert math.isclose(metrics["BitsPerByte"].compute().item(), nats.item() / (math.log(2) * n_bytes),
                                rel_tol=1e-5)
            accuracy = (logits.argmax(-1) == targets).float().mean().item()
            assert math.isclose(metrics["Accuracy"].compute().item(), accuracy, rel_tol=1e-6)


def test_flops_count_every_linear_weight_three_times_two():
    model = build_hf_model({"class": "llama", "vocab_size": 100, "hidden_size": 8, "intermediate_size": 16,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1}, 0)
    linear = 8 * 8 + 8 * 4 * 2 + 8 * 8 + 3 * 8 * 16 + 8 * 100  # q k v o, mlp, lm_head
    assert flops_per_token(model, seq_len=10) == 3 * (2 * linear + 4 * 10 * 8)
