"""Trainer throughput: slm's Composer Trainer against a bare PyTorch loop, in one run.

Both sides train the same model (same init), on the same MDS shards through the same
StreamingDataset, with the same batch, AdamW, clipping and precision; the bare loop does
nothing else (no metrics, no logging, no checkpoints). Ours computes train metrics every
batch, as it does in real runs; checkpoints and evaluation are off for the timed window.
Goal on CPU: slm / bare >= 0.9.

Also times HF Mamba's CPU paths: the mambapy parallel scan against the sequential fallback.

    python bench/train.py [--models llama-1m mamba-1m] [--batch 16] [--steps 8]
"""

from __future__ import annotations

import os
import sys

# bench/tokenize.py would shadow the stdlib `tokenize` for any script run from this folder.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from streaming import StreamingDataset  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from slm.config import load_config  # noqa: E402
from slm.corpus import write_corpus  # noqa: E402
from slm.data import collate  # noqa: E402
from slm.model import build_hf_model  # noqa: E402
from slm.shards import write_shards  # noqa: E402
from slm.sources import iter_batches, load_documents  # noqa: E402
from slm.tokenizer import tokenizer_identity, train_tokenizer  # noqa: E402
from slm.train import build_trainer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def make_data(root: Path, seq_len: int) -> None:
    write_corpus(root / "stories.jsonl", 4000, seed=0)
    ds = load_documents(str(root / "stories.jsonl"), "story")
    tok = train_tokenizer(iter_batches(ds, "story"), 4096, len(ds))
    tok.save_pretrained(str(root / "tok"))
    for split in ("train", "eval"):
        write_shards(iter_batches(ds, "story"), tok, tokenizer_identity(tok, str(root / "tok")), seq_len,
                     out_dir=root / split)


def time_slm(cfg, warmup: int, steps: int) -> float:
    """Seconds for `steps` batches of slm's Trainer, after `warmup` batches."""
    trainer = build_trainer(cfg)
    trainer.fit(duration=f"{warmup}ba")
    start = time.perf_counter()
    trainer.fit(duration=f"{steps}ba")
    seconds = time.perf_counter() - start
    trainer.close()
    return seconds


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama-1m", "mamba-1m"], help="suite yamls to time")
    parser.add_argument("--batch", type=int, default=16, help="global batch size (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8, help="timed batches per side (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = args.batch * args.seq_len * args.steps

    root = Path(tempfile.mkdtemp(prefix="slm-bench-train-"))
    try:
        make_data(root, args.seq_len)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
        print(f"{args.steps} timed batches of {args.batch} x {args.seq_len} tokens after {args.warmup} warm-up")
        for name in args.models:
            overrides = [f"run_name=bench-{name}", f"save_folder={root}/ckpt/{{run_name}}", "save_interval=0ba",
                         "early_checkpoints=0", "eval_interval=0ba", f"global_batch_size={args.batch}",
                         f"data.train.local={root / 'train'}", f"data.eval.local={root / 'eval'}",
                         f"tokenizer={root / 'tok'}", "log_interval=1000ba"]
            cfg = load_config(REPO / "yamls" / f"{name}.yaml", overrides)
            bare = time_bare(cfg, args.warmup, args.steps, device)
            ours = time_slm(cfg, args.warmup, args.steps)
            print(f"  {name:10s} bare loop {tokens / bare:9,.0f} tok/s   slm {tokens / ours:9,.0f} tok/s   "
                  f"slm / bare = {bare / ours:.2f}")
            if cfg.model["class"] == "mamba" and device == "cpu":  # one sequence: the sequential path is slow
                one = load_config(REPO / "yamls" / f"{name}.yaml", [*overrides, "global_batch_size=1"])
                fast = args.seq_len * 2 / time_bare(one, 1, 2, device)
                slow = args.seq_len / time_bare(one, 1, 1, device, {"use_mambapy": False})
                print(f"  {name:10s} mamba CPU paths, batch 1: mambapy {fast:7,.0f} tok/s   sequential "
                      f"{slow:7,.0f} tok/s   mambapy / sequential = {fast / slow:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
