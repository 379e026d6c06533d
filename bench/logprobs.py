"""Log-probs at the speed of a forward pass: `slm logprobs`' inner loop against a bare loop, same run, taking turns.

Both sides compute, for the same model and the same samples of an MDS split, log p(token i | tokens < i) at every
position from a float32 log-softmax, batch by batch. The bare loop has the samples in memory and keeps the
log-probs as arrays; slm's (`write_table`, what `slm logprobs` runs for each checkpoint) takes them from the split
as `slm logprobs` reads it once for all checkpoints (`split_samples`) and writes the Parquet table. They take
turns `--rounds` times and each side's median time counts. Goal (issue 46): slm / bare >= 0.9 in samples/s.

    python bench/logprobs.py [--models llama-100k llama-1m mamba-100k] [--samples 128] [--seq-len 256] [--batch-size 16]
                             [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def bare(model: torch.nn.Module, samples: torch.Tensor, batch_size: int) -> list[np.ndarray]:
    """The log-probs of every sample, batch by batch, from the model alone."""
    out = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            ids = samples[start:start + batch_size]
            logits = model(ids, use_cache=False).logits.float()
            picked = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            out.append(picked.numpy())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama-100k", "llama-1m", "mamba-100k"])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    from slm.analysis.logprobs import Reading, write_table
    from slm.analysis.samples import split_samples
    from slm.core.config import load_config
    from slm.training.model import build_hf_model

    from benchlib import REPO, docs_for, machine, report, scratch_with_data

    figures: dict = {"machine": machine(), "samples": args.samples, "seq_len": args.seq_len,
                     "batch_size": args.batch_size, "models": {}}
    with scratch_with_data("logprobs", docs_for(args.samples, args.seq_len), 4096, args.seq_len) as tmp:
        data = tmp / "mds" / "train"
        with split_samples(data, args.samples) as split:
            samples = split.count
            in_memory = split.memory.clone()  # the bare loop's own copy
            for name in args.models:
                cfg = load_config(REPO / "yamls" / f"{name}.yaml",
                                  [f"model.max_position_embeddings={args.seq_len}"] if "llama" in name else [])
                model = build_hf_model(dict(cfg.model), cfg.seed).eval()
                times: dict[str, list[float]] = {"bare": [], "slm": []}
                bare(model, in_memory[:args.batch_size], args.batch_size)  # warm-up, both sides
                write_table(model, split, tmp / "warm-up.parquet", name, Reading(args.batch_size, "float32"))
                for _ in range(args.rounds):
                    start = time.perf_counter()
                    expected = np.concatenate(bare(model, in_memory, args.batch_size))
                    times["bare"].append(time.perf_counter() - start)
                    out = tmp / f"{name}.parquet"
                    out.unlink(missing_ok=True)
                    start = time.perf_counter()
                    write_table(model, split, out, name, Reading(args.batch_size, "float32"))
                    times["slm"].append(time.perf_counter() - start)
                import pyarrow.parquet as pq

                got = np.array(pq.read_table(out)["logprobs"].to_pylist(), dtype=np.float32)[:, 1:]
                same = bool(np.array_equal(got, expected))
                bare_s, slm_s = statistics.median(times["bare"]), statistics.median(times["slm"])
                figures["models"][name] = {"bare_seconds": bare_s, "slm_seconds": slm_s, "ratio": bare_s / slm_s,
                                           "identical": same}
                print(f"{name}: bare {samples / bare_s:,.0f} samples/s, slm logprobs {samples / slm_s:,.0f} "
                      f"samples/s: slm / bare {bare_s / slm_s:.2f} (goal >= 0.9); the same log-probs: {same}",
                      flush=True)
    report(figures, args.json)


if __name__ == "__main__":
    main()
