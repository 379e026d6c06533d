"""Peak memory of `slm tokenize` on a corpus and on one 4x as large: flat, because documents stream
from memory-mapped Arrow in batches and each shard is written once it fills.

Each size is tokenized twice: with a cold `datasets` cache (the first run, which converts the jsonl
to Arrow) and a warm one (the Arrow file is reused: only our streaming pipeline runs). Each command
runs as its own process. Two peaks: its anonymous memory (RssAnon, sampled every 10 ms),
what the machine must really find; and its peak resident set as the kernel counts it (ru_maxrss),
which also counts the pages of the memory-mapped Arrow file read so far: page cache, given back
under pressure, growing with the corpus. Baseline: the same interpreter importing what `slm
tokenize` imports and doing nothing. The 1x corpus must fill more than one shard (Streaming's
MDSWriter holds up to 64 MB of samples before writing one), or the figures show the shard buffer
growing instead. Goals: anonymous peak at 4x / at 1x <= 1.1 with a warm cache, <= 1.2 cold.

    python bench/memory.py [--num-docs 200000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchlib import BIN, machine, peaks_mib, slm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-docs", type=int, default=200_000, help="stories in the 1x corpus (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="slm-bench-memory-") as tmp:
        root = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(root / "cache")  # the children's Arrow conversions land here
        imports = peaks_mib([sys.executable, "-c",
                             "import slm.cli, slm.data.shards, slm.data.documents, slm.data.tokenizer"])
        sizes = {}
        for scale in (1, 4):
            corpus = root / f"stories-{scale}x.jsonl"
            slm("corpus", "--out", str(corpus), "--num-docs", str(scale * args.num_docs))
            sizes[scale] = corpus.stat().st_size / 2**20
        slm("tokenizer", "-i", str(root / "stories-1x.jsonl"), "-f", "story", "-v", "4096", "--out-dir",
            str(root / "tok"))
        peaks = {}
        for scale in (1, 4):  # first with a cold `datasets` cache (jsonl -> Arrow conversion), then warm
            for cache in ("cold", "warm"):
                peaks[f"{scale}x {cache}"] = peaks_mib([
                    str(BIN / "slm"), "tokenize", "-i", str(root / f"stories-{scale}x.jsonl"), "-f", "story",
                    "-t", str(root / "tok"), "-l", "512", "--out-dir", str(root / f"mds-{scale}x-{cache}")])
    print(f"machine: {machine()}")
    print(f"  {'':44s} {'anonymous peak':>16s} {'resident peak (ru_maxrss)':>26s}")
    print(f"  {'imports only (baseline)':44s} {imports[0]:12.0f} MiB {imports[1]:22.0f} MiB")
    for key, (anon, resident) in peaks.items():
        scale, cache = int(key[0]), key.split()[1]
        label = f"slm tokenize, {scale}x corpus ({sizes[scale]:.0f} MiB), {cache} cache"
        print(f"  {label:44s} {anon:12.0f} MiB {resident:22.0f} MiB")
    for cache in ("cold", "warm"):
        print(f"  {cache} cache: anonymous peak at 4x / at 1x = {peaks[f'4x {cache}'][0] / peaks[f'1x {cache}'][0]:.2f}"
              f"; resident peak {peaks[f'4x {cache}'][1] / peaks[f'1x {cache}'][1]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"docs": args.num_docs, "corpus_mib": sizes, "imports_mib": imports,
                                         "peak_mib": peaks}, indent=2) + "\n")

if __name__ == "__main__":
    main()
