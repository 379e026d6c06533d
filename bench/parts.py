"""Tokenizing in parts: `slm tokenize --parts N` against one `slm tokenize` process, on the same corpus, same run.

  one        `slm tokenize`: one process (the Rust tokenizer's threads on every core)
  parts      `slm tokenize --parts N`: N processes side by side (the cores shared among them), then the merge
  each part  `--parts N --part P` one at a time, then `--merge` alone: what tokenizing costs against what the merge
             (chunking, MDS encoding, zstd, sha1: the writer) costs
Every command runs as a subprocess with a datasets cache of its own (each pays the jsonl -> Arrow conversion), its
peak RSS that of its largest process. Goals (issue 45): parts / one <= 1.1 on this machine; <= 2.5 GB a part.
`--stream`: the corpus as 8 files, every command reading them streamed (`--stream`: no Arrow cache, a part reads
only its own files).

    python bench/parts.py [--num-docs 200000] [--parts 2] [--stream] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runs a command and prints the largest resident set of it and its descendants (kB), on its last line.
PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def timed(name: str, argv: list[str], cache: Path) -> tuple[float, int]:
    """Run `argv` with a fresh datasets cache; its seconds and peak RSS in bytes (of its largest process)."""
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return seconds, int(proc.stdout.split()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-docs", type=int, default=200_000, help="stories in the corpus (default: %(default)s)")
    parser.add_argument("--parts", type=int, default=2, help="parts (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--stream", action="store_true", help="the corpus in 8 files, read streamed")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    from benchlib import BIN, machine, slm

    tmp = Path(tempfile.mkdtemp(prefix="slm-bench-parts-"))
    try:
        corpus = tmp / "stories.jsonl"
        slm("corpus", "--out", str(corpus), "--num-docs", str(args.num_docs))
        sample = tmp / "sample.jsonl"
        with corpus.open() as f:
            sample.write_text("".join(f.readline() for _ in range(5000)))
        slm("tokenizer", "-i", str(sample), "-f", "story", "-v", "4096", "--out-dir", str(tmp / "tok"))
        source = [str(corpus)]
        if args.stream:
            lines = corpus.read_text().splitlines(keepends=True)
            for i in range(8):
                (tmp / f"stories-{i}.jsonl").write_text("".join(lines[len(lines) * i // 8:len(lines) * (i + 1) // 8]))
            corpus.unlink()
            source = [str(tmp / "stories-*.jsonl"), "--stream"]
        tokenize = [str(BIN / "slm"), "tokenize", "-i", *source, "-f", "story", "-t", str(tmp / "tok"),
                    "-l", str(args.seq_len)]
        cache = tmp / "cache"
        one = timed("one process", [*tokenize, "--out-dir", str(tmp / "one")], cache)
        parts = timed(f"{args.parts} parts", [*tokenize, "--out-dir", str(tmp / "parts"), "--parts",
                                              str(args.parts)], cache)
        same = all((tmp / "one" / f.name).read_bytes() == f.read_bytes() for f in (tmp / "parts").iterdir())
        each = [timed(f"part {p}", [*tokenize, "--out-dir", str(tmp / "each"), "--parts", str(args.parts),
                                    "--part", str(p)], cache) for p in range(1, args.parts + 1)]
        merge = timed("merge", [*tokenize, "--out-dir", str(tmp / "each"), "--parts", str(args.parts), "--merge"],
                      cache)
        meta = json.loads((tmp / "one" / "slm-dataset.json").read_text())
        megabytes = sum(f.stat().st_size for f in tmp.glob("stories*.jsonl")) / 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    tokens = meta["tokens"]
    tokenizing = sum(s for s, _ in each)
    figures = {"docs": args.num_docs, "megabytes": megabytes, "tokens": tokens, "parts": args.parts,
               "streamed": args.stream,
               "one": {"seconds": one[0], "peak_bytes": one[1]}, "in_parts": {"seconds": parts[0],
                                                                              "peak_bytes": parts[1]},
               "each_part": [{"seconds": s, "peak_bytes": b} for s, b in each],
               "merge": {"seconds": merge[0], "peak_bytes": merge[1]}, "identical": same, "cpus": os.cpu_count()}
    print(f"machine: {machine()}")
    print(f"corpus: {args.num_docs:,} stories, {megabytes:.1f} MB, {tokens:,} tokens"
          + (", 8 files read streamed" if args.stream else ""))
    print(f"  one process            {one[0]:7.1f} s  {tokens / one[0]:>12,.0f} tokens/s  peak "
          f"{one[1] / 2**30:.2f} GiB")
    print(f"  {args.parts} parts side by side   {parts[0]:7.1f} s  {tokens / parts[0]:>12,.0f} tokens/s  peak "
          f"{parts[1] / 2**30:.2f} GiB (largest process)  ratio to one process {parts[0] / one[0]:.2f} (goal <= 1.1)")
    for p, (s, b) in enumerate(each, 1):
        print(f"  part {p} alone            {s:7.1f} s  peak {b / 2**30:.2f} GiB")
    print(f"  merge alone            {merge[0]:7.1f} s  peak {merge[1] / 2**30:.2f} GiB; the writer's share "
          f"{merge[0] / (tokenizing + merge[0]):.0%} of parts one at a time plus the merge")
    print(f"  the parts' folder equals the one process's byte for byte: {same}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
