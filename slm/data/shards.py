"""Tokenizing documents into MDS shards (`slm tokenize`).

The chunking rule (version "slm-v1"): tokenize each document without special tokens,
append `<eos>` after every document, concatenate, cut into pieces of `seq_len - 1`
tokens and put `<bos>` in front of each piece. Every sample is exactly `seq_len`
tokens; the last short piece is dropped; no padding.

Documents stream through in batches (Rust-side threads do the encoding), samples stream
into `streaming.MDSWriter`, so memory does not grow with the corpus (but for one length per
document). Beside the shards, `slm-documents.npz` records where every sample came from: the
source document of its first token and the offset of that token in it, and every document's
length in tokens (with its <eos>), which name every document a sample holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np
from streaming import MDSWriter
from tqdm import tqdm

from slm.core.errors import Refused, SlmError
from slm.core.foreign import checked_folder, count, mapping, optional, read_json, shown, stored_members, text
from slm.core.paths import partial_folder, refuse_to_clobber, require_output
from slm.core.shard_index import checked_index

CHUNKING_RULE = "slm-v1"
METADATA_FILE = "slm-dataset.json"
DOCUMENTS_FILE = "slm-documents.npz"
DOCUMENTS_FORMAT = 1
MAX_SEQ_LEN = 2**24  # tokens of a sample read from elsewhere: far past any context


def token_dtype(vocab_size: int) -> np.dtype:
    """Return uint16 while every id fits, else uint32 (docs/design.md, "MDS layout")."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def token_stream(docs: Iterable[list[int]], eos_id: int, dtype: np.dtype) -> np.ndarray:
    """Return the documents' ids (without specials) as the chunking rule's stream: each followed by <eos>."""
    return np.fromiter(chain.from_iterable(chain(doc, (eos_id,)) for doc in docs), dtype)


class Chunker:
    """Applies the chunking rule incrementally: documents' token ids in, full samples out."""

    def __init__(self, seq_len: int, bos_id: int, eos_id: int, dtype: np.dtype):
        if seq_len < 2:
            raise SlmError(f"seq_len must be at least 2 (one <bos> plus one token), got {seq_len}")
        self.seq_len, self.bos_id, self.eos_id, self.dtype = seq_len, bos_id, eos_id, dtype
        self.pending = np.empty(0, dtype)  # tokens waiting for a full piece

    def add(self, docs: Iterable[list[int]]) -> np.ndarray:
        """Feed documents (ids without specials); returns the samples completed, shape (n, seq_len)."""
        return self.add_stream(token_stream(docs, self.eos_id, self.dtype))

    def add_stream(self, tokens: np.ndarray) -> np.ndarray:
        """Feed the next tokens of the stream (`token_stream`'s: each document's ids, then its <eos>); returns the
        samples completed, shape (n, seq_len)."""
        stream = np.concatenate([self.pending, tokens.astype(self.dtype, copy=False)])
        piece = self.seq_len - 1
        n = len(stream) // piece
        samples = np.empty((n, self.seq_len), self.dtype)
        samples[:, 0] = self.bos_id
        samples[:, 1:] = stream[: n * piece].reshape(n, piece)
        self.pending = stream[n * piece:]
        return samples


def chunk(docs: Iterable[list[int]], seq_len: int, bos_id: int, eos_id: int) -> np.ndarray:
    """Apply the whole rule at once, for small inputs and tests."""
    return Chunker(seq_len, bos_id, eos_id, np.dtype(np.uint32)).add(docs)


@dataclass
class Documents:
    """Where each sample of a shard folder came from (`slm-documents.npz`, format 1)."""

    sample_document: np.ndarray  # int64 per sample: index in the source split of the document of its first token
    sample_offset: np.ndarray  # int64 per sample: that token's offset in the document
    document_tokens: np.ndarray  # int64 per document: its tokens, its <eos> included
    seq_len: int

    @classmethod
    def of_lengths(cls, document_tokens: np.ndarray, samples: int, seq_len: int) -> Documents:
        """Make the record of a folder of `samples` samples cut from documents of these lengths by the chunking rule."""
        starts = np.arange(samples, dtype=np.int64) * (seq_len - 1)  # in the concatenated tokens, <bos> aside
        ends = np.cumsum(document_tokens)
        first = np.searchsorted(ends, starts, side="right")
        return cls(first, starts - (ends[first] - document_tokens[first]), document_tokens, seq_len)

    def of_sample(self, sample: int) -> list[int]:
        """Return the documents sample `sample` holds tokens of, in order."""
        document = int(self.sample_document[sample])
        left = self.seq_len - 1 - (int(self.document_tokens[document]) - int(self.sample_offset[sample]))
        held = [document]
        while left > 0 and document + 1 < len(self.document_tokens):
            document += 1
            held.append(document)
            left -= int(self.document_tokens[document])
        return held

    def save(self, folder: Path) -> None:
        """Write the record into `folder` as slm-documents.npz (format 1: plain arrays, uncompressed)."""
        np.savez(folder / DOCUMENTS_FILE, format=np.int64(DOCUMENTS_FORMAT), seq_len=np.int64(self.seq_len),
                 sample_document=self.sample_document, sample_offset=self.sample_offset,
                 document_tokens=self.document_tokens)


def read_documents(folder: Path) -> Documents | None:
    """Read a shard folder's document record (maybe someone else's: an npz of plain arrays, nothing compressed, no
    pickle; a record per sample its index.json counts, each value within what it may be); None for shards written
    before slm kept one."""
    path = checked_folder(folder, "shard folder") / DOCUMENTS_FILE
    if not path.exists():
        return None
    index = Path(folder) / "index.json"
    samples = sum(shard["samples"] for shard in checked_index(read_json(index, "shard index"), Path(folder),
                                                              f"shard index {index}"))
    stored_members(path, "document record")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("format", "seq_len", "sample_document", "sample_offset",
                                                 "document_tokens")}
    except (OSError, KeyError, ValueError, EOFError) as e:
        raise SlmError(f"{path} is truncated or corrupt ({str(e)[:200]}): re-run `slm tokenize`") from e
    scalars = {key: arrays[key].item() if arrays[key].shape == () and arrays[key].dtype.kind == "i" else None
               for key in ("format", "seq_len")}
    if scalars["format"] != DOCUMENTS_FORMAT:
        raise SlmError(f"{path} is format {shown(scalars['format'])}; this slm reads format {DOCUMENTS_FORMAT}")
    seq_len = count(scalars["seq_len"], f"{path}: seq_len", at_most=MAX_SEQ_LEN)
    documents = arrays["document_tokens"]
    for key, length in (("document_tokens", None), ("sample_document", samples), ("sample_offset", samples)):
        array = arrays[key]
        if array.ndim != 1 or array.dtype != np.int64 or (length is not None and len(array) != length):
            raise Refused(f"{path}: {key} is no array of {length if length is not None else 'any number of'} "
                          f"whole numbers ({array.dtype}, shape {array.shape}): refused (docs/security.md)")
        low, high = (1, np.iinfo(np.int64).max) if key == "document_tokens" else (0, len(documents) - 1)
        if key == "sample_offset":
            high = int(documents.max(initial=0))
        if len(array) and (array.min() < low or array.max() > high):
            raise Refused(f"{path}: {key} holds {array.min()}..{array.max()}, outside {low}..{high}: refused "
                          "(docs/security.md)")
    return Documents(arrays["sample_document"], arrays["sample_offset"], documents, seq_len)


@dataclass
class ShardStats:
    """What writing shards did: documents, tokens, samples, the tail dropped, the time."""
    documents: int = 0
    tokens: int = 0  # document tokens plus one <eos> per document, before chunking
    samples: int = 0
    dropped_tail_tokens: int = 0
    seconds: float = 0.0


def _encode_batches(tokenizer, batches: Iterable[list[str]]) -> Iterator[list[list[int]]]:
    """Yield each batch's ids, in order. The Rust tokenizer's thread pool encodes batch k+1 (without the GIL) while
    the caller chunks and writes batch k."""
    backend = tokenizer.backend_tokenizer

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for texts in batches:
            future = pool.submit(encode, texts)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def encoded_streams(tokenizer, batches: Iterable[list[str]], eos_id: int, dtype: np.dtype
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield, per batch of texts: its token stream (`token_stream`) and each document's tokens, <eos> included."""
    for ids in _encode_batches(tokenizer, batches):
        yield token_stream(ids, eos_id, dtype), np.fromiter(map(len, ids), np.int64, len(ids)) + 1


def write_shards(batches: Iterable[list[str]], tokenizer, identity: dict, seq_len: int, *,
                 out_dir: Path | None, out_remote: str | None = None, compression: str | None = "zstd",
                 overwrite: bool = False, total_docs: int | None = None, source: dict | None = None
                 ) -> ShardStats:
    """Tokenize, chunk and write MDS shards plus `slm-dataset.json`; returns the counts."""
    streams = encoded_streams(tokenizer, batches, identity["eos_id"], token_dtype(identity["vocab_size"]))
    return write_streams(streams, identity, seq_len, out_dir=out_dir, out_remote=out_remote, compression=compression,
                         overwrite=overwrite, total_docs=total_docs, source=source)


def write_streams(streams: Iterable[tuple[np.ndarray, np.ndarray]], identity: dict, seq_len: int, *,
                  out_dir: Path | None, out_remote: str | None = None, compression: str | None = "zstd",
                  overwrite: bool = False, total_docs: int | None = None, source: dict | None = None,
                  desc: str = "Tokenizing") -> ShardStats:
    """Chunk token streams (pieces of the whole stream in order, each with its documents' lengths) and write MDS
    shards plus `slm-dataset.json` and `slm-documents.npz`; returns the counts. The shards are the same whatever
    the pieces are: they depend on the whole stream only."""
    require_output(out_dir, out_remote, "--out-remote")
    dtype = token_dtype(identity["vocab_size"])
    chunker = Chunker(seq_len, identity["bos_id"], identity["eos_id"], dtype)
    if out_dir is not None:
        refuse_to_clobber(out_dir, overwrite)
        if out_dir.is_file():
            raise SlmError(f"output {out_dir} is a file, not a folder")
    stats = ShardStats()
    lengths: list[np.ndarray] = []  # per piece: each document's tokens, its <eos> included
    start = time.perf_counter()
    with partial_folder(out_dir) if out_dir else nullcontext() as partial:
        out = (str(partial), out_remote) if partial and out_remote else str(partial or out_remote)
        with MDSWriter(out=out, columns={"tokens": f"ndarray:{dtype.name}:{seq_len}"},
                       compression=None if compression in (None, "none") else compression,
                       hashes=["sha1"], keep_local=partial is not None) as writer, \
                tqdm(total=total_docs, unit="doc", unit_scale=True, desc=desc) as bar:
            for tokens, documents in streams:
                samples = chunker.add_stream(tokens)
                for sample in samples:
                    writer.write({"tokens": sample})
                lengths.append(documents)
                stats.documents += len(documents)
                stats.tokens += len(tokens)
                stats.samples += len(samples)
                bar.update(len(documents))
                bar.set_postfix(tokens=f"{stats.tokens:,}",
                                tok_per_s=f"{stats.tokens / (time.perf_counter() - start):,.0f}")
            if stats.samples == 0:
                raise SlmError(_too_short(stats, seq_len))
            stats.dropped_tail_tokens = len(chunker.pending)
            stats.seconds = time.perf_counter() - start
            _write_metadata(Path(writer.local), identity, seq_len, dtype, stats, source or {})
            Documents.of_lengths(np.concatenate(lengths), stats.samples, seq_len).save(Path(writer.local))
            if writer.remote:
                writer.cloud_writer.upload_file(METADATA_FILE)
                writer.cloud_writer.upload_file(DOCUMENTS_FILE)
    return stats


def _too_short(stats: ShardStats, seq_len: int) -> str:
    """Return the error line for an input that gives no sample: no documents, or too few tokens for one of seq_len."""
    if stats.documents == 0:
        return "the input has no documents"
    return (f"the input gives {stats.tokens} tokens ({stats.documents} documents), too few for one sample "
            f"of seq_len {seq_len}; use more text or a smaller --seq-len")


def _write_metadata(folder: Path, identity: dict, seq_len: int, dtype: np.dtype, stats: ShardStats,
                    source: dict) -> None:
    """Write `folder`'s slm-dataset.json: chunking rule, tokenizer, seq_len, dtype, source, document record, counts."""
    meta = {"chunking_rule": CHUNKING_RULE, "tokenizer": identity, "seq_len": seq_len, "dtype": dtype.name,
            "column": "tokens", "source": source,
            "document_record": {"file": DOCUMENTS_FILE, "format": DOCUMENTS_FORMAT},
            **{k: v for k, v in asdict(stats).items() if k != "seconds"}}
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_metadata(folder: Path) -> dict:
    """Read the `slm-dataset.json` of a shard folder (maybe someone else's), every field slm reads checked: the
    tokenizer's name (a location: opened only as a tokenizer, with its content hash: slm/data/tokenizer.py) and ids,
    the seq_len and counts; the source it names is only ever shown, never opened, unless named again (`--source`)."""
    path = checked_folder(folder, "shard folder") / METADATA_FILE
    try:
        meta = mapping(read_json(path, "dataset record"), str(path))
    except FileNotFoundError:
        raise SlmError(f"{folder} has no {METADATA_FILE}: make it with `slm tokenize`") from None
    tokenizer = mapping(meta.get("tokenizer"), f"{path}: tokenizer")
    for key in ("name", "content_hash"):
        text(tokenizer.get(key), f"{path}: tokenizer.{key}", limit=4096)
    count(tokenizer.get("vocab_size"), f"{path}: tokenizer.vocab_size", at_most=2**32)
    for key in ("bos_id", "eos_id", "pad_id"):
        optional(count, tokenizer.get(key), f"{path}: tokenizer.{key}", at_most=2**32)
    count(meta.get("seq_len"), f"{path}: seq_len", at_most=MAX_SEQ_LEN)
    for key in ("samples", "tokens", "documents", "dropped_tail_tokens"):
        optional(count, meta.get(key), f"{path}: {key}")
    for key, value in mapping(meta.get("source") or {}, f"{path}: source").items():
        optional(text, value, f"{path}: source.{key}", limit=4096)
    return meta
