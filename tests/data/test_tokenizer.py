import hashlib
import json
import random

import pytest
import transformers
from transformers import AutoTokenizer

from slm.core.errors import SlmError
from slm.data.tokenizer import load_tokenizer, tokenizer_identity, tokenizer_matches

from helpers import bos_template, edited_tokenizer, old_merges, swap_a_b

pytestmark = pytest.mark.stack  # CI runs this module on the current stack too (make test-stack)


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


def _hash(folder) -> str:
    return tokenizer_identity(load_tokenizer(str(folder)), "x")["content_hash"]


def _legacy_hash(tok) -> str:
    """The content hash slm recorded before it hashed what decides the ids: the serialized tokenizer's."""
    return "sha256:" + hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()


def test_content_hash_is_the_same_for_the_same_tokenizer(tokenizer_dir, tmp_path):
    a = tokenizer_identity(load_tokenizer(str(tokenizer_dir)), "x")
    b = tokenizer_identity(load_tokenizer(str(tokenizer_dir)), "x")
    assert a == b and a["content_hash"].startswith("sha256:")
    old = edited_tokenizer(tokenizer_dir, tmp_path / "old-merges", old_merges)
    assert isinstance(json.loads((old / "tokenizer.json").read_text())["model"]["merges"][0], str)
    assert _hash(old) == a["content_hash"]
    templated = edited_tokenizer(tokenizer_dir, tmp_path / "bos-template", bos_template)
    tok = load_tokenizer(str(templated))
    assert tok("hi").input_ids[0] == tok.bos_token_id  # the post-processor is in effect
    assert _legacy_hash(tok) != _legacy_hash(load_tokenizer(str(tokenizer_dir)))  # what refused such shards
    assert _hash(templated) == a["content_hash"]


def test_a_folder_resaved_by_transformers_5_loads_and_keeps_its_identity(tokenizer_dir, tmp_path):
    """What transformers 5.24 / tokenizers 0.23 write when they load and save this folder (observed, not guessed):
    a class name the pinned transformers does not know, and a post-processor that adds nothing."""
    def as_transformers_5_saves_it(spec: dict) -> None:
        sequence = [{"Sequence": {"id": "A", "type_id": 0}}]
        spec["post_processor"] = {"type": "TemplateProcessing", "single": sequence,
                                  "pair": sequence + [{"Sequence": {"id": "B", "type_id": 1}}], "special_tokens": {}}

    resaved = edited_tokenizer(tokenizer_dir, tmp_path / "resaved", as_transformers_5_saves_it)
    (resaved / "tokenizer_config.json").write_text(json.dumps({
        "backend": "tokenizers", "bos_token": "<bos>", "clean_up_tokenization_spaces": False, "eos_token": "<eos>",
        "is_local": True, "local_files_only": False, "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>", "tokenizer_class": "TokenizersBackend"}))
    (resaved / "special_tokens_map.json").unlink(missing_ok=True)
    tok = load_tokenizer(str(resaved))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    original = load_tokenizer(str(tokenizer_dir))
    assert tokenizer_matches(tok, tokenizer_identity(original, "x"))
    if transformers.__version__.startswith("4."):  # transformers 5 gives the original that post-processor too
        assert _legacy_hash(tok) != _legacy_hash(original)


def test_content_hash_differs_for_another_vocabulary(tokenizer_dir, tmp_path, corpus):
    from slm.data.tokenizer import train_tokenizer

    stories = [json.loads(line)["story"] for line in corpus.read_text().splitlines()]
    train_tokenizer([stories], 400).save_pretrained(tmp_path / "smaller")
    swapped = edited_tokenizer(tokenizer_dir, tmp_path / "swapped", swap_a_b)
    assert load_tokenizer(str(swapped)).convert_tokens_to_ids("a") == \
        load_tokenizer(str(tokenizer_dir)).convert_tokens_to_ids("b")
    hashes = {_hash(tokenizer_dir), _hash(tmp_path / "smaller"), _hash(swapped)}
    assert len(hashes) == 3


def test_content_hash_of_a_unigram_tokenizer_covers_its_scores():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def unigram(score: float) -> PreTrainedTokenizerFast:
        raw = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0), ("ab", score)], unk_id=0))
        raw.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")

    assert tokenizer_identity(unigram(-1.5), "")["content_hash"] == tokenizer_identity(unigram(-1.5), "")[
        "content_hash"] != tokenizer_identity(unigram(-1.25), "")["content_hash"]


def test_a_recorded_legacy_hash_still_matches(tokenizer_dir, tmp_path):
    tok = load_tokenizer(str(tokenizer_dir))
    assert tokenizer_matches(tok, tokenizer_identity(tok, "x"))
    assert tokenizer_matches(tok, {"content_hash": _legacy_hash(tok)})
    swapped = load_tokenizer(str(edited_tokenizer(tokenizer_dir, tmp_path / "swapped", swap_a_b)))
    assert not tokenizer_matches(swapped, {"content_hash": _legacy_hash(tok)})
    assert not tokenizer_matches(swapped, tokenizer_identity(tok, "x"))


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


def test_a_tokenizer_trained_on_the_first_documents_of_a_streamed_corpus(corpus, tmp_path):
    """`--max-docs N` on a streamed input: the tokenizer one gets from the first N documents loaded whole."""
    from helpers import run_slm

    common = ["tokenizer", "-i", str(corpus), "-f", "story", "-v", "300"]
    proc = run_slm(*common, "--stream", "--max-docs", "150", "--out-dir", str(tmp_path / "streamed"))
    assert "on 150 documents" in proc.stdout
    run_slm(*common, "-s", "train[:150]", "--out-dir", str(tmp_path / "sliced"))
    run_slm(*common, "--out-dir", str(tmp_path / "whole"))
    vocab = {name: json.loads((tmp_path / name / "tokenizer.json").read_text())["model"]["vocab"]
             for name in ("streamed", "sliced", "whole")}
    assert vocab["streamed"] == vocab["sliced"] != vocab["whole"]
