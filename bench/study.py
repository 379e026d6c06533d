"""A study's size: time and peak memory of `slm logprobs` and `slm dynamics` over a synthetic suite.

A real llama-100k run trained to `--checkpoints` batches with a checkpoint at every batch (the suite: each
checkpoint a model of its own), and a split of `--samples` samples of `--seq-len` tokens. Each command runs as its
own process, as a user types it; its wall time and its peak anonymous memory (RssAnon, sampled every 10 ms) and
resident set (ru_maxrss) count:

- `slm logprobs RUN --out-dir TABLES`: every checkpoint's table (samples/s, tokens/s);
- `slm dynamics RUN --logprobs TABLES`: the per-position and per-token tables from those tables, in the chunks the
  memory bound allows (default), and again in chunks of `--chunk-samples` samples: the same tables (compared
  value for value) in less memory (losses/s).

The figures feed docs/benchmarks.md's projection of a Pythia-sized study (154 checkpoints x 10k x 2,048 tokens).

    python bench/study.py [--checkpoints 40] [--samples 2000] [--seq-len 512] [--chunk-samples 250] [--json FILE]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchlib import BIN, REPO, docs_for, machine, peaks_mib, report, scratch_with_data


def timed(command: list[str]) -> dict:
    """Run `command` as its own process; its wall seconds and peak memory (MiB)."""
    start = time.perf_counter()
    anon, rss = peaks_mib(command)
    return {"seconds": time.perf_counter() - start, "peak_anon_mib": anon, "peak_rss_mib": rss}


def train_suite(root: Path, checkpoints: int, seq_len: int) -> Path:
    """Train llama-100k to `checkpoints` batches of 8 samples, saving every batch; the run folder."""
    overrides = ["run_name=study", f"save_folder={root}/ckpt/{{run_name}}", f"max_duration={checkpoints}ba",
                 "global_batch_size=8", "eval_interval=0ba", "early_checkpoints=0", "save_interval=1ba",
                 f"model.max_position_embeddings={seq_len}", f"data.train.local={root}/mds/train",
                 f"data.eval.local={root}/mds/validation"]
    proc = subprocess.run([sys.executable, "slm/train.py", "yamls/llama-100k.yaml", *overrides], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"training the suite failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return root / "ckpt" / "study"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=40)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--chunk-samples", type=int, default=250, help="the small chunks' size")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import pyarrow.parquet as pq

    figures: dict = {"machine": machine(), "checkpoints": args.checkpoints, "samples": args.samples,
                     "seq_len": args.seq_len, "chunk_samples": args.chunk_samples, "model": "llama-100k"}
    with scratch_with_data("study", docs_for(args.samples, args.seq_len), 4096, args.seq_len) as root:
        data = root / "mds" / "train"
        run = train_suite(root, args.checkpoints, args.seq_len)
        slm = str(BIN / "slm")
        common = ["-d", str(data), "--max-samples", str(args.samples)]
        figures["logprobs"] = timed([slm, "logprobs", str(run), *common, "--out-dir", str(root / "tables")])
        tables = sorted((root / "tables").glob("*.parquet"))
        if len(tables) != args.checkpoints or pq.ParquetFile(tables[0]).metadata.num_rows != args.samples:
            raise SystemExit(f"expected {args.checkpoints} tables of {args.samples} samples, found {len(tables)}")
        for name, chunk in (("dynamics", []), ("dynamics_chunked", ["--chunk-samples", str(args.chunk_samples)])):
            figures[name] = timed([slm, "dynamics", str(run), *common, "--logprobs", str(root / "tables"),
                                   "-o", str(root / name / "dynamics.parquet"), *chunk])
        same = all(pq.read_table(root / "dynamics" / f).equals(pq.read_table(root / "dynamics_chunked" / f))
                   for f in ("dynamics.parquet", "dynamics-tokens.parquet"))
        figures["dynamics_chunked"]["same_tables"] = same
        tokens = args.samples * args.seq_len
        losses = args.checkpoints * args.samples * (args.seq_len - 1)
        lp, dyn, small = figures["logprobs"], figures["dynamics"], figures["dynamics_chunked"]
        print(f"suite: {args.checkpoints} checkpoints of llama-100k x {args.samples:,} samples x {args.seq_len} tokens "
              f"({losses:,} losses)")
        print(f"slm logprobs: {lp['seconds']:.0f} s, {args.checkpoints * tokens / lp['seconds']:,.0f} tokens/s, "
              f"peak {lp['peak_anon_mib']:,.0f} MiB anonymous ({lp['peak_rss_mib']:,.0f} MiB resident)")
        for label, f in (("slm dynamics (default chunks)", dyn), (f"slm dynamics (chunks of {args.chunk_samples})",
                                                                   small)):
            print(f"{label}: {f['seconds']:.0f} s, {losses / f['seconds']:,.0f} losses/s, peak "
                  f"{f['peak_anon_mib']:,.0f} MiB anonymous ({f['peak_rss_mib']:,.0f} MiB resident)")
        print(f"the chunked tables equal the default's, value for value: {same}")
    report(figures, args.json)


if __name__ == "__main__":
    main()
