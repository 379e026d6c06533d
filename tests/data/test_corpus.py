import json
import random
import re

from slm.data.corpus import MAX_WORDS, MIN_WORDS, story, write_corpus

from helpers import run_slm


def test_same_seed_gives_byte_identical_file(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    run_slm("corpus", "--out", str(a), "--num-docs", "300", "--seed", "7")
    write_corpus(b, 300, seed=7)
    write_corpus(c, 300, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_stories_have_the_promised_shape(corpus):
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert len(docs) == 400 and all(set(d) == {"story"} for d in docs)
    lengths = [len(d["story"].split()) for d in docs]
    assert MIN_WORDS <= min(lengths) and max(lengths) <= MAX_WORDS
    assert len(set(d["story"] for d in docs)) == len(docs)
    assert sum('"' in d["story"] for d in docs) > 0.9 * len(docs)  # dialogue


def test_vocabulary_is_several_hundred_words():
    rng = random.Random(0)
    words = {w.lower() for _ in range(3000) for w in re.findall(r"[A-Za-z]+", story(rng))}
    assert 300 <= len(words) <= 2000


def test_characters_keep_their_names_through_a_story():
    rng = random.Random(3)
    for _ in range(50):
        text = story(rng)
        name = re.search(r"named (\w+)", text).group(1)
        assert text.count(name) >= 3
