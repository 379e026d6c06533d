"""`slm tokenize` writes the MDS layout of docs/design.md, read back with the stock Streaming reader."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from helpers import mds_tokens, run_slm


def expected_samples(docs: list[str], tokenizer_dir: Path, seq_len: int) -> np.ndarray:
    """The chunking rule recomputed independently, one document at a time, in plain Python."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    stream: list[int] = []
    for doc in docs:
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    piece = seq_len - 1
    rows = [[tok.bos_token_id] + stream[i:i + piece] for i in range(0, len(stream) - piece + 1, piece)]
    return np.array(rows).reshape(-1, seq_len)


def corpus_docs(corpus: Path) -> list[str]:
    return [json.loads(line)["story"] for line in corpus.read_text().splitlines()]


def tokenize(inp, tokenizer_dir, out, *extra, seq_len=64, feature="story"):
    return run_slm("tokenize", "-i", str(inp), "-f", feature, "-t", str(tokenizer_dir), "-l", str(seq_len),
                   "--out-dir", str(out), *extra)


def test_shards_equal_an_independent_recomputation(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "mds"
    proc = tokenize(corpus, tokenizer_dir, out, "--batch-size", "37")
    samples = mds_tokens(out)
    docs = corpus_docs(corpus)
    np.testing.assert_array_equal(samples, expected_samples(docs, tokenizer_dir, 64))
    assert samples.dtype == np.uint16 and (samples[:, 0] == 0).all()
    meta = json.loads((out / "slm-dataset.json").read_text())
    assert meta["seq_len"] == 64 and meta["dtype"] == "uint16" and meta["samples"] == len(samples)
    assert meta["documents"] == len(docs) and meta["chunking_rule"] == "slm-v1"
    assert meta["tokenizer"]["bos_id"] == 0 and meta["tokenizer"]["content_hash"].startswith("sha256:")
    assert meta["tokens"] == samples.size - len(samples) + meta["dropped_tail_tokens"]
    assert f"{len(samples):,} samples" in proc.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["shards"][0]["column_names"] == ["tokens"]
    assert index["shards"][0]["compression"].startswith("zstd")


def test_decoded_samples_reproduce_the_corpus_in_order(corpus, tokenizer_dir, tmp_path):
    tokenize(corpus, tokenizer_dir, tmp_path / "mds", seq_len=128)
    samples = mds_tokens(tmp_path / "mds")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = tok.decode(samples[:, 1:].reshape(-1).tolist())  # drop every <bos>, keep the <eos> separators
    docs = corpus_docs(corpus)
    *complete, tail = text.split("<eos>")
    assert complete == docs[: len(complete)]
    assert docs[len(complete)].startswith(tail)
    assert len(complete) >= len(docs) - 1


def test_split_slicing(corpus, tokenizer_dir, tmp_path):
    tokenize(corpus, tokenizer_dir, tmp_path / "a", "-s", "train[:75%]")
    tokenize(corpus, tokenizer_dir, tmp_path / "b", "-s", "train[75%:]")
    docs = corpus_docs(corpus)
    for name, part in (("a", docs[:300]), ("b", docs[300:])):
        np.testing.assert_array_equal(mds_tokens(tmp_path / name), expected_samples(part, tokenizer_dir, 64))
        assert json.loads((tmp_path / name / "slm-dataset.json").read_text())["documents"] == len(part)


def write_format(kind: str, docs: list[str], root: Path) -> tuple[Path, list[str], list[str]]:
    """Write `docs` as `kind`; returns (input path, extra CLI args, documents as the reader sees them)."""
    frame = pd.DataFrame({"story": docs})
    if kind == "txt-lines":
        path = root / "docs.txt"
        path.write_text("\n\n".join(docs) + "\n")  # blank lines between documents are not documents
        return path, ["-f", "text"], docs
    if kind == "txt-per-file":
        (root / "txt").mkdir()
        multi = [d.replace(". ", ".\n") for d in docs]  # documents with line breaks inside
        for i, d in enumerate(multi):
            (root / "txt" / f"{i:04d}.txt").write_text(d)
        return root / "txt", ["-f", "text", "--txt-per-file"], multi
    if kind.startswith("babylm"):  # BabyLM's files: a sentence a line, documents between blank lines
        (root / "babylm").mkdir()
        blocks = [d.replace(". ", ".\n") for d in docs]
        for name, chunk in (("a.train", blocks[:40]), ("b.train", blocks[40:])):
            (root / "babylm" / name).write_text("\n\n".join(chunk) + "\n")
        if kind == "babylm":
            return root / "babylm" / "*.train", ["-f", "text"], blocks
        return root / "babylm" / "*.train", ["-f", "text", "--txt-by", "line"], \
            [line for block in blocks for line in block.splitlines()]
    if kind == "json":
        path = root / "docs.json"
        frame.to_json(path, orient="records")
    elif kind == "jsonl":
        path = root / "docs.jsonl"
        frame.to_json(path, orient="records", lines=True)
    elif kind == "jsonl.zst":
        import zstandard

        path = root / "docs.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(frame.to_json(orient="records", lines=True).encode()))
    elif kind == "jsonl-folder":
        path = root / "folder"
        path.mkdir()
        for i in range(0, len(docs), 25):
            frame[i:i + 25].to_json(path / f"part-{i // 25:03d}.jsonl", orient="records", lines=True)
    elif kind == "parquet":
        path = root / "docs.parquet"
        frame.to_parquet(path)
    elif kind == "csv":
        path = root / "docs.csv"
        frame.to_csv(path, index=False)
    elif kind == "save_to_disk":
        path = root / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame)}).save_to_disk(str(path))
    elif kind == "save_to_disk-dataset":
        path = root / "saved1"
        datasets.Dataset.from_pandas(frame).save_to_disk(str(path))
    return path, ["-f", "story"], docs


FILE_FORMATS = ["txt-lines", "txt-per-file", "babylm", "babylm-lines", "json", "jsonl", "jsonl.zst", "jsonl-folder",
                "parquet", "csv"]
FORMATS = [*FILE_FORMATS, "save_to_disk", "save_to_disk-dataset"]


@pytest.mark.parametrize("kind", FORMATS)
def test_every_input_format(kind, corpus, tokenizer_dir, tmp_path):
    docs = corpus_docs(corpus)[:100]
    path, args, seen = write_format(kind, docs, tmp_path)
    split = "train[:50%]" if kind.startswith("save_to_disk") else "train"  # slicing a save_to_disk folder too
    run_slm("tokenize", "-i", str(path), *args, "-s", split, "-t", str(tokenizer_dir), "-l", "32",
            "--out-dir", str(tmp_path / "mds"))
    expected = seen[:50] if split != "train" else seen
    np.testing.assert_array_equal(mds_tokens(tmp_path / "mds"), expected_samples(expected, tokenizer_dir, 32))


@pytest.mark.parametrize("kind", FILE_FORMATS)
def test_every_file_format_streamed(kind, corpus, tokenizer_dir, tmp_path):
    """Read as it goes (`--stream`, `datasets` streaming): the same documents in the same order as loaded whole."""
    path, args, seen = write_format(kind, corpus_docs(corpus)[:100], tmp_path)
    run_slm("tokenize", "-i", str(path), *args, "--stream", "-t", str(tokenizer_dir), "-l", "32",
            "--out-dir", str(tmp_path / "mds"))
    np.testing.assert_array_equal(mds_tokens(tmp_path / "mds"), expected_samples(seen, tokenizer_dir, 32))


def test_uint32_tokens_for_a_vocabulary_above_65536(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(70_000)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(tmp_path / "big")
    docs = ["w69999 w5 w65535", "w65536 w1 w69000 w70", "w2"]
    pd.DataFrame({"text": docs}).to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    tokenize(tmp_path / "d.jsonl", tmp_path / "big", tmp_path / "mds", seq_len=4, feature="text")
    samples = mds_tokens(tmp_path / "mds")
    assert samples.dtype == np.uint32
    assert samples.tolist() == [[0, 70002, 8, 65538], [0, 1, 65539, 4], [0, 69003, 73, 1]]


def test_output_is_never_overwritten_without_flag(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "mds"
    tokenize(corpus, tokenizer_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run_slm("tokenize", "-i", str(corpus), "-f", "story", "-t", str(tokenizer_dir), "-l", "32",
                   "--out-dir", str(out), check=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    tokenize(corpus, tokenizer_dir, out, "--overwrite", seq_len=32)
    assert json.loads((out / "slm-dataset.json").read_text())["seq_len"] == 32
    assert not list(tmp_path.glob(".mds*"))  # no partial or old folder left behind


def test_remote_output_through_streaming_uploader(corpus, tokenizer_dir, tmp_path):
    remote = tmp_path / "remote"  # a local path is a Streaming remote too: same uploader code path
    run_slm("tokenize", "-i", str(corpus), "-f", "story", "-t", str(tokenizer_dir), "-l", "64",
            "--out-dir", str(tmp_path / "local"), "--out-remote", str(remote), "--compression", "none")
    assert (remote / "slm-dataset.json").exists() and (remote / "index.json").exists()
    np.testing.assert_array_equal(mds_tokens(tmp_path / "cache", remote), mds_tokens(tmp_path / "local"))


def test_a_glob_of_files_reads_them_in_sorted_order(corpus, tokenizer_dir, tmp_path):
    """Three files matched by a glob give the samples and document record of the one file they were cut from."""
    lines = corpus.read_text().splitlines(keepends=True)
    (tmp_path / "parts").mkdir()
    for name, chunk in (("b.jsonl", lines[150:300]), ("a.jsonl", lines[:150]), ("c.jsonl", lines[300:])):
        (tmp_path / "parts" / name).write_text("".join(chunk))
    tokenize(corpus, tokenizer_dir, tmp_path / "whole")
    tokenize(f"{tmp_path}/parts/*.jsonl", tokenizer_dir, tmp_path / "globbed")
    np.testing.assert_array_equal(mds_tokens(tmp_path / "globbed"), mds_tokens(tmp_path / "whole"))
    for name in ("slm-documents.npz", "index.json"):
        assert (tmp_path / "globbed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    meta = json.loads((tmp_path / "globbed" / "slm-dataset.json").read_text())
    assert meta["source"]["dataset"] == f"{tmp_path}/parts/*.jsonl" and meta["documents"] == len(lines)


def test_a_url_is_read_streamed_as_the_file_would_be_loaded(corpus, tokenizer_dir, tmp_path):
    """A URL fsspec reads (here file://, as hf:// and s3:// go through the same code) is streamed."""
    tokenize(corpus, tokenizer_dir, tmp_path / "loaded", "-s", "train")
    proc = tokenize(f"file://{corpus}", tokenizer_dir, tmp_path / "url")
    assert "Generating train split" not in proc.stderr  # nothing prepared whole in the cache
    np.testing.assert_array_equal(mds_tokens(tmp_path / "url"), mds_tokens(tmp_path / "loaded"))
