"""Trainer throughput: slm's Composer Trainer against a bare PyTorch loop, in one run.

Both sides train the same model (same init), on the same MDS shards through the same
StreamingDataset, with the same batch, AdamW, clipping and precision (fp32 on CPU, bf16
autocast on GPU); the bare loop does nothing else (no metrics, no logging, no checkpoints).
Ours computes train metrics every batch, as it does in real runs; checkpoints and evaluation
are off for the timed window. The two alternate (--rounds) and the best time of each counts, so
neither gains from running second in a warmed-up process. Goal: slm / bare >= 0.9.

Also, per model: the training data loader alone (samples/s it can deliver against what training
consumes), MFU on a GPU (the FLOPs SpeedMonitor counts over the GPU's bf16 peak), and Mamba's
paths: on CPU the mambapy parallel scan against HF's sequential fallback (batch 1), on a GPU the
mamba-ssm kernels against mambapy (when mamba-ssm and causal-conv1d are installed).

    python bench/train.py [--models llama-1m mamba-1m] [--batch 8] [--steps 6] [--json FILE]
"""

from __future__ import annotations

# bench/tokenize.py would shadow the stdlib `tokenize` for any script run from this folder.
import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from composer.callbacks.speed_monitor import get_gpu_flops_available
from streaming import StreamingDataset
from torch.utils.data import DataLoader

from slm.config import load_config
from slm.data import collate
from slm.model import build_hf_model, count_parameters, flops_per_token, mamba_kernels_available
from slm.train import build_trainer

from benchlib import REPO, machine, make_data, time_loader


def time_slm(cfg, warmup: int, steps: int) -> tuple[float, float]:
    """Seconds for `steps` batches of slm's Trainer after `warmup` batches, and the device's peak FLOP/s
    for the run's precision as SpeedMonitor takes it (0 on CPU)."""
    trainer = build_trainer(cfg)
    trainer.fit(duration=f"{warmup}ba")
    start = time.perf_counter()
    trainer.fit(duration=f"{steps}ba")
    seconds = time.perf_counter() - start
    peak = get_gpu_flops_available(trainer.state) or 0.0
    trainer.close()
    return seconds, peak


def time_bare(cfg, warmup: int, steps: int, device: str, model_overrides: dict | None = None) -> float:
    """Seconds for `steps` batches of a plain PyTorch loop over the same model, data and optimizer."""
    model = build_hf_model({**cfg.model, **(model_overrides or {})}, cfg.seed).to(device)
    dataset = StreamingDataset(local=cfg.data.train.local, batch_size=cfg.global_batch_size, shuffle=True,
                               shuffle_seed=cfg.data.shuffle_seed, num_canonical_nodes=1)
    loader = iter(DataLoader(dataset, batch_size=cfg.global_batch_size, collate_fn=collate, drop_last=True))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.optimizer.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas))
    bf16 = device == "cuda"
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize() if bf16 else None
            start = time.perf_counter()
        batch = {k: v.to(device) for k, v in next(loader).items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize() if bf16 else None
    return time.perf_counter() - start


@contextlib.contextmanager
def without_mamba_kernels():
    """HF Mamba takes the mamba-ssm kernels whenever they import; this makes it take the mambapy path."""
    from transformers.models.mamba import modeling_mamba
    saved = modeling_mamba.is_fast_path_available
    modeling_mamba.is_fast_path_available = False
    try:
        yield
    finally:
        modeling_mamba.is_fast_path_available = saved


def mamba_paths(cfg_for, name: str, args, device: str) -> dict:
    """Tokens/s of Mamba's fast path against its fallback, bare loop, same model and data."""
    if device == "cpu":  # one sequence: the sequential path is slow
        one = cfg_for(name, ["global_batch_size=1"])
        fast = args.seq_len * 2 / time_bare(one, 1, 2, device)
        slow = args.seq_len / time_bare(one, 1, 1, device, {"use_mambapy": False})
        return {"fast": "mambapy", "slow": "sequential", "batch": 1, "fast_tok_s": fast, "slow_tok_s": slow}
    if not mamba_kernels_available():
        return {"fast": "mamba-ssm", "slow": "mambapy", "skipped": "mamba-ssm / causal-conv1d not installed "
                "(pip install -e '.[cuda]')"}
    cfg = cfg_for(name, [])
    tokens = args.batch * args.seq_len * args.steps
    fast = tokens / time_bare(cfg, args.warmup, args.steps, device)
    with without_mamba_kernels():
        slow = tokens / time_bare(cfg, args.warmup, args.steps, device)
    return {"fast": "mamba-ssm", "slow": "mambapy", "batch": args.batch, "fast_tok_s": fast, "slow_tok_s": slow}


def bench_model(name: str, cfg_for, args, device: str) -> dict:
    cfg = cfg_for(name, [])
    tokens = args.batch * args.seq_len * args.steps
    bare = ours = float("inf")
    for _ in range(args.rounds):  # alternating, best of each: neither side gains from coming second
        bare = min(bare, time_bare(cfg, args.warmup, args.steps, device))
        seconds, peak_flops = time_slm(cfg, args.warmup, args.steps)
        ours = min(ours, seconds)
    loader = time_loader(cfg, args.batch, args.loader_batches, args.warmup)
    model = build_hf_model(dict(cfg.model), cfg.seed)
    result = {"model": name, "class": cfg.model["class"], "params": count_parameters(model),
              "bare_tok_s": tokens / bare, "slm_tok_s": tokens / ours,
              "loader_samples_s": args.batch * args.loader_batches / loader,
              "train_samples_s": args.batch * args.steps / ours,
              "mfu": flops_per_token(model, args.seq_len) * tokens / ours / peak_flops if peak_flops else None}
    print(f"  {name:10s} bare loop {result['bare_tok_s']:9,.0f} tok/s   slm {result['slm_tok_s']:9,.0f} tok/s   "
          f"slm / bare = {bare / ours:.2f}" + (f"   MFU {result['mfu']:.1%}" if result["mfu"] else ""))
    print(f"  {name:10s} data loader alone {result['loader_samples_s']:9,.0f} samples/s   training consumes "
          f"{result['train_samples_s']:7,.1f} samples/s   loader / training = "
          f"{result['loader_samples_s'] / result['train_samples_s']:,.0f}")
    if cfg.model["class"] == "mamba":
        paths = result["mamba_paths"] = mamba_paths(cfg_for, name, args, device)
        if "skipped" in paths:
            print(f"  {name:10s} mamba-ssm kernels: {paths['skipped']}")
        else:
            print(f"  {name:10s} mamba paths, batch {paths['batch']}: {paths['fast']} {paths['fast_tok_s']:9,.0f} "
                  f"tok/s   {paths['slow']} {paths['slow_tok_s']:9,.0f} tok/s   {paths['fast']} / {paths['slow']} = "
                  f"{paths['fast_tok_s'] / paths['slow_tok_s']:.1f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="suite yamls to time (default: llama-1m mamba-1m on CPU, "
                        "llama-25m mamba-25m on a GPU)")
    parser.add_argument("--batch", type=int, help="global batch size (default: 8 on CPU, 64 on a GPU)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, help="timed batches per side (default: 6 on CPU, 30 on a GPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of bare loop and slm; the best "
                        "time of each counts (default: %(default)s)")
    parser.add_argument("--loader-batches", type=int, default=50, help="batches the data loader alone is timed on")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    args.models = args.models or (["llama-25m", "mamba-25m"] if gpu else ["llama-1m", "mamba-1m"])
    args.batch = args.batch or (64 if gpu else 8)
    args.steps = args.steps or (30 if gpu else 6)

    root = Path(tempfile.mkdtemp(prefix="slm-bench-train-"))
    try:
        make_data(root, 4000, 4096, args.seq_len)

        def cfg_for(name: str, extra: list[str]):
            overrides = [f"run_name=bench-{name}", f"save_folder={root}/ckpt/{{run_name}}", "save_interval=0ba",
                         "early_checkpoints=0", "eval_interval=0ba", f"global_batch_size={args.batch}",
                         f"data.train.local={root / 'mds/train'}", f"data.eval.local={root / 'mds/validation'}",
                         f"tokenizer={root / 'tok'}", "log_interval=1000ba", *extra]
            return load_config(REPO / "yamls" / f"{name}.yaml", overrides)

        print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"{args.steps} timed batches of {args.batch} x {args.seq_len} tokens after {args.warmup} warm-up, "
              f"{'amp_bf16' if gpu else 'fp32'}, best of {args.rounds} alternating rounds")
        results = [bench_model(name, cfg_for, args, device) for name in args.models]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        settings = {k: getattr(args, k) for k in ("batch", "seq_len", "steps", "warmup", "rounds", "loader_batches")}
        args.json.write_text(json.dumps({"device": device, "precision": "amp_bf16" if gpu else "fp32", **settings,
                                         "models": results}, indent=2) + "\n")

if __name__ == "__main__":
    main()
