import math

import torch
from transformers import AutoTokenizer

from slm.metrics import BitsPerByte, byte_lengths
from slm.model import build_hf_model, flops_per_token


def test_byte_table_counts_the_utf8_bytes_of_decoded_text(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    table = byte_lengths(tok)
    text = 'Once upon a time, Zoë said "hi" to 猫 🐱.\nThe end.'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert int(table[ids].sum()) == len(text.encode("utf-8"))
    assert table[tok.bos_token_id] == table[tok.eos_token_id] == table[tok.pad_token_id] == 0


def test_bits_per_byte_is_nats_over_ln2_bytes(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    table = byte_lengths(tok)
    torch.manual_seed(0)
    target = torch.randint(3, len(tok), (2, 7))
    target[0, -1] = -100  # ignored position
    logits = torch.randn(2, 7, len(tok))
    metric = BitsPerByte(table)
    metric.update(logits, target)
    mask = target != -100
    nats = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
    assert math.isclose(metric.compute().item(), nats.item() / (math.log(2) * table[target[mask]].sum().item()),
                        rel_tol=1e-5)


def test_flops_count_every_linear_weight_three_times_two():
    model = build_hf_model({"class": "llama", "vocab_size": 100, "hidden_size": 8, "intermediate_size": 16,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1}, 0)
    linear = 8 * 8 + 8 * 4 * 2 + 8 * 8 + 3 * 8 * 16 + 8 * 100  # q k v o, mlp, lm_head
    assert flops_per_token(model, seq_len=10) == 3 * (2 * linear + 4 * 10 * 8)
