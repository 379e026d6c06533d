"""`slm eval` over a suite's checkpoints against a bare loop: the split read once, every checkpoint evaluated.

K checkpoints (llama-100k from K seeds, each an `slm export`-style folder: weights, config, tokenizer) are
evaluated on the same samples of an MDS split. slm's side is `evaluate_runs`, what `slm eval CKPT... --data --out`
runs: it opens the split once (read into memory), and for each checkpoint loads it, checks its tokenizer and
vocabulary against the split, computes cross-entropy, perplexity, accuracy and bits per byte, and rewrites the
table. The bare side loads each folder with transformers and computes the cross-entropy of in-memory samples. Both
run in this process and take turns `--rounds` times; each side's median counts. Goal (issue 46): slm / bare >= 0.9.

    python bench/evals.py [--checkpoints 8] [--samples 256] [--seq-len 256] [--batch-size 16] [--rounds 3]
                          [--json FILE]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch


def bare(folders: list[Path], samples: torch.Tensor, batch_size: int) -> list[float]:
    """Each checkpoint's mean next-token cross-entropy on the samples, from the model alone."""
    from transformers import AutoModelForCausalLM

    losses = []
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        total, count = torch.zeros((), dtype=torch.float64), 0
        with torch.no_grad():
            for start in range(0, len(samples), batch_size):
                ids = samples[start:start + batch_size]
                targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # no copy of the logits
                logits = model(ids, use_cache=False).logits.float()
                total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
                count += ids[:, 1:].numel()
        losses.append(total.item() / count)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--samples", type=int, default=256, help="a multiple of --batch-size")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import pyarrow.parquet as pq

    from slm.analysis.evaluate import evaluate_runs
    from slm.analysis.samples import split_samples
    from slm.core.config import load_config
    from slm.training.model import build_hf_model

    from benchlib import REPO, docs_for, machine, report, scratch_with_data

    figures: dict = {"machine": machine(), "checkpoints": args.checkpoints, "samples": args.samples,
                     "seq_len": args.seq_len, "batch_size": args.batch_size, "model": "llama-100k"}
    with scratch_with_data("evals", docs_for(args.samples, args.seq_len), 4096, args.seq_len) as tmp:
        data = tmp / "mds" / "train"
        cfg = load_config(REPO / "yamls" / "llama-100k.yaml", [f"model.max_position_embeddings={args.seq_len}"])
        folders = [tmp / "ckpts" / f"seed{seed}" for seed in range(args.checkpoints)]
        for seed, folder in enumerate(folders):
            build_hf_model(dict(cfg.model), seed).save_pretrained(folder)
            shutil.copytree(tmp / "tok", folder, dirs_exist_ok=True)
        with split_samples(data, args.samples) as split:
            samples = split.memory.clone()  # the bare loop's own copy
        bare(folders[:1], samples[:args.batch_size], args.batch_size)  # warm-up: imports, first forward
        evaluate_runs([str(folders[0])], data, tmp / "warm-up.parquet", batch_size=args.batch_size, max_batches=1)
        times: dict[str, list[float]] = {"bare": [], "slm": []}
        for turn in range(args.rounds):
            start = time.perf_counter()
            expected = bare(folders, samples, args.batch_size)
            times["bare"].append(time.perf_counter() - start)
            out = tmp / f"evals{turn}.parquet"
            start = time.perf_counter()
            evaluate_runs([str(f) for f in folders], data, out, batch_size=args.batch_size,
                          max_batches=args.samples // args.batch_size)
            times["slm"].append(time.perf_counter() - start)
        rows = pq.read_table(out).to_pylist()
        got = [next(r["value"] for r in rows if r["model"] == str(f) and r["metric"] == "CrossEntropy")
               for f in folders]
        same = all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, expected, strict=True))
        bare_s, slm_s = statistics.median(times["bare"]), statistics.median(times["slm"])
        figures.update(bare_seconds=bare_s, slm_seconds=slm_s, ratio=bare_s / slm_s, same_losses=same)
        print(f"{args.checkpoints} checkpoints x {args.samples} samples x {args.seq_len} tokens: bare "
              f"{args.checkpoints / bare_s:.2f} checkpoints/s, slm eval {args.checkpoints / slm_s:.2f} checkpoints/s: "
              f"slm / bare {bare_s / slm_s:.2f} (goal >= 0.9); the same cross-entropies: {same}", flush=True)
    report(figures, args.json)


if __name__ == "__main__":
    main()
