"""Tokenizer pipeline throughput: `slm tokenize` against the raw `tokenizers` batch encode.

Both sides encode the same text with the same number of Rust threads, in the same run.
  baseline   texts already in memory -> `Tokenizer.encode_batch_fast` (ids only, nothing written)
  pipeline   `load_documents` + `write_shards`: jsonl -> datasets -> encode -> chunk -> finished MDS
  cli        the whole `slm tokenize` command as a subprocess (interpreter start-up and imports included)
Goal: pipeline / baseline >= 0.8.

    python bench/tokenizing.py [--num-docs 100000] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-docs", type=int, default=100_000, help="stories in the corpus (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="Rust threads (default: all cores)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # read by tokenizers when its pool starts
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="slm-bench-"))
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "cache")  # before `datasets` is imported: it reads it once

    from slm.data.corpus import write_corpus
    from slm.data.documents import iter_batches, load_documents
    from slm.data.shards import write_shards
    from slm.data.tokenizer import load_tokenizer, tokenizer_identity, train_tokenizer

    from benchlib import machine, slm

    try:
        corpus = tmp / "stories.jsonl"
        write_corpus(corpus, args.num_docs, seed=0)
        texts = [json.loads(line)["story"] for line in corpus.open()]
        megabytes = sum(len(t.encode()) for t in texts) / 1e6
        train_tokenizer([texts[:5000]], 4096).save_pretrained(str(tmp / "tok"))
        tok = load_tokenizer(str(tmp / "tok"))
        backend = tok.backend_tokenizer

        start = time.perf_counter()
        tokens = sum(len(e.ids) for i in range(0, len(texts), 1000)
                     for e in backend.encode_batch_fast(texts[i:i + 1000], add_special_tokens=False))
        baseline = time.perf_counter() - start
        del texts

        start = time.perf_counter()
        ds = load_documents(str(corpus), "story")
        write_shards(iter_batches(ds, "story"), tok, tokenizer_identity(tok, "tok"), args.seq_len,
                     out_dir=tmp / "mds", total_docs=len(ds))
        pipeline = time.perf_counter() - start

        shutil.rmtree(tmp / "cache")
        start = time.perf_counter()
        slm("tokenize", "-i", str(corpus), "-f", "story", "-t", str(tmp / "tok"), "-l", str(args.seq_len),
            "--out-dir", str(tmp / "mds-cli"))
        cli = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"machine: {machine()}; {args.threads} tokenizer threads")
    print(f"corpus: {args.num_docs:,} stories, {megabytes:.1f} MB, {tokens:,} tokens")
    seconds = {"baseline": baseline, "pipeline": pipeline, "cli": cli}
    for key, name in (("baseline", "raw encode_batch_fast (baseline)"), ("pipeline", "slm pipeline -> MDS"),
                      ("cli", "slm tokenize CLI, cold cache")):
        print(f"  {name:34s} {seconds[key]:6.2f} s  {megabytes / seconds[key]:6.2f} MB/s  "
              f"ratio {baseline / seconds[key]:.2f}")
    print(f"pipeline / baseline = {baseline / pipeline:.2f} (goal >= 0.8)")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "docs": args.num_docs, "megabytes": megabytes,
                                         "tokens": tokens, "seconds": seconds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
