import random

import pytest
from transformers import AutoTokenizer

from slm.errors import SlmError
from slm.tokenizer import load_tokenizer, tokenizer_identity


def random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0x00A0, 0x024F), (0x0370, 0x03FF), (0x0400, 0x04FF), (0x0590, 0x06FF),
              (0x0900, 0x097F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
              (0x0300, 0x036F), (0x10000, 0x1007F)]
    out = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.1:
            out.append(rng.choice([" ", "  ", "\n", "\t", "\r\n", "\u200b", "\ufeff", "<bos>", "<eos>"]))
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_special_tokens_have_ids_0_1_2_and_autotokenizer_loads_it(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert 300 < len(tok) <= 512


def test_decode_encode_round_trips_any_unicode(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    rng = random.Random(0)
    texts = [random_unicode(rng, rng.randint(0, 200)) for _ in range(300)]
    texts += ["Once upon a time, Lily said: \"Hi!\"  ", " leading space", "trailing\n\n", "a . b , c !"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text


def test_content_hash_identifies_the_tokenizer(tokenizer_dir):
    a = tokenizer_identity(load_tokenizer(str(tokenizer_dir)), "x")
    b = tokenizer_identity(load_tokenizer(str(tokenizer_dir)), "x")
    assert a == b and a["content_hash"].startswith("sha256:")


def test_tokenizer_without_bos_eos_needs_them_named(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    with pytest.raises(SlmError, match="has no bos token; name one with --bos-token"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(SlmError, match="not in the vocabulary"):
        load_tokenizer(str(tmp_path), bos_token="<nope>", eos_token="</s>")
    tok = load_tokenizer(str(tmp_path), bos_token="<s>", eos_token="</s>")
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
