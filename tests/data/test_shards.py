"""Golden examples of the chunking rule (docs/design.md, "Chunking rule")."""

import numpy as np
import pytest

from slm.core.errors import SlmError
from slm.data.shards import Chunker, chunk, token_dtype

BOS, EOS = 0, 1


def test_design_example():
    a, b, c, d, e = 10, 11, 12, 13, 14
    assert chunk([[a, b, c], [d, e]], seq_len=4, bos_id=BOS, eos_id=EOS).tolist() == [
        [BOS, a, b, c],
        [BOS, EOS, d, e],
    ]  # the final <eos> is the dropped tail


def test_document_longer_than_several_chunks():
    doc = list(range(100, 117))  # 17 tokens + eos = 18 = 6 pieces of 3
    assert chunk([doc], seq_len=4, bos_id=BOS, eos_id=EOS).tolist() == [
        [BOS, 100, 101, 102], [BOS, 103, 104, 105], [BOS, 106, 107, 108],
        [BOS, 109, 110, 111], [BOS, 112, 113, 114], [BOS, 115, 116, EOS],
    ]


def test_empty_documents_contribute_only_their_eos():
    assert chunk([[], [5], [], [6, 7]], seq_len=3, bos_id=BOS, eos_id=EOS).tolist() == [
        [BOS, EOS, 5], [BOS, EOS, EOS], [BOS, 6, 7],
    ]  # tail: the last <eos>


def test_short_tail_is_dropped_and_nothing_padded():
    assert chunk([[5, 6]], seq_len=8, bos_id=BOS, eos_id=EOS).shape == (0, 8)


def test_batches_of_any_size_give_the_same_samples():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 500, rng.integers(0, 40)).tolist() for _ in range(200)]
    whole = chunk(docs, seq_len=16, bos_id=BOS, eos_id=EOS)
    chunker = Chunker(16, BOS, EOS, np.dtype(np.uint32))
    cuts = sorted(rng.choice(len(docs), 20, replace=False))
    parts = [chunker.add(docs[i:j]) for i, j in zip([0, *cuts], [*cuts, len(docs)], strict=True)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert all(row[0] == BOS for row in whole) and whole.shape[1] == 16


def test_seq_len_below_two_is_refused():
    with pytest.raises(SlmError, match="seq_len must be at least 2"):
        Chunker(1, BOS, EOS, np.dtype(np.uint16))


def test_token_dtype_switches_above_65536():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
