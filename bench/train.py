"""Trainer cost: slm's Composer Trainer against a bare PyTorch loop, in one run, taking turns.

Both sides train the same model (same init) on the same MDS shards through the same data path
(`MappedShards`), with the same batch, AdamW, clipping and precision (fp32 on CPU, bf16 autocast
on GPU). The bare loop does nothing else. slm does what a real run does except checkpoints and
evaluation: train metrics (updated every batch, computed every log_interval), SpeedMonitor,
LRMonitor, metrics.jsonl rows, the preemption check. The two take turns in short chunks after a
warm-up, and each side's median time per batch over its chunks counts, so the machine's drift and
noise fall on both; framework cost = slm's ms per batch - the bare loop's.

Shapes (--shapes):
  floor   llama-50k and mamba-50k at 8 x 64: the framework's floor. Goals: <= 3 ms a batch, and
          slm / bare >= 0.9 for llama-50k. Then both compiled (`compile=true`, `torch.compile` of the bare
          model), goals: slm compiled >= 1.15x the bare eager loop, >= 0.9x the bare compiled loop. Then
          the cost of one event of Composer's dispatch and of slm's (a batch has 13), and two
          llama-50k runs side by side (`--per-device 2`: the cores split between them) against one after
          the other (goal >= 1.6).
  suite   llama-100k and llama-1m at 256 x 512, the suite's batch. Goal: slm / bare >= 0.95 for llama-1m.
  gpu     llama-100k, llama-1m, llama-25m and mamba-25m at 256 x 512 in amp_bf16, with MFU (the FLOPs
          SpeedMonitor counts over the GPU's bf16 peak). Goals: slm / bare >= 0.9, llama-25m MFU >= 40%.
Default: floor and suite on CPU, gpu on a GPU.

Also, per model: the training data loader alone (samples/s it can deliver against what training
consumes) and, for Mamba, its paths: on CPU the mambapy parallel scan against HF's sequential
fallback (batch 1), on a GPU the mamba-ssm kernels against mambapy (when they are installed).

    python bench/train.py [--shapes floor suite] [--models llama-50k] [--chunks N] [--quick] [--no-compile]
                          [--json FILE]
"""

from __future__ import annotations

# bench/tokenize.py would shadow the stdlib `tokenize` for any script run from this folder.
import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Iterator
from pathlib import Path

import torch
from composer.callbacks.speed_monitor import get_gpu_flops_available
from composer.core import Callback, Event, State
from composer.loggers import Logger
from torch.utils.data import DataLoader

from slm.core import composer_workarounds, streaming_workarounds
from slm.core.config import load_config
from slm.data.loading import collate
from slm.data.mapped_shards import MappedShards
from slm.training.model import build_hf_model, count_parameters, flops_per_token, mamba_kernels_available
from slm.training.trainer import start_run

from benchlib import REPO, machine, make_data, time_loader
from syncs import ByBatch, HostSyncs

# shape -> models, batch, seq_len, warm-up batches, batches per chunk, chunks per side
SHAPES = {
    "floor": {"models": ["llama-50k", "mamba-50k"], "batch": 8, "seq_len": 64, "warmup": 20, "chunk": 20, "chunks": 15,
              "compile": True, "together": "llama-50k"},
    "suite": {"models": ["llama-100k", "llama-1m"], "batch": 256, "seq_len": 512, "warmup": 2, "chunk": 2,
              "chunks": 3},
    "gpu": {"models": ["llama-100k", "llama-1m", "llama-25m", "mamba-25m"], "batch": 256, "seq_len": 512,
            "warmup": 10, "chunk": 10, "chunks": 6},
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class ChunkClock(Callback):
    """Seconds per batch of each `fit()` call, from its second batch to its end (the first carries the call's own
    start-up: a new data iterator, fit-start callbacks)."""

    def __init__(self, device: str):
        self.device, self.per_batch, self.batches, self.start = device, [], 0, 0.0

    def fit_start(self, state: State, logger: Logger) -> None:
        self.batches = 0

    def before_dataloader(self, state: State, logger: Logger) -> None:
        self.batches += 1
        if self.batches == 2:
            sync(self.device)
            self.start = time.perf_counter()

    def fit_end(self, state: State, logger: Logger) -> None:
        sync(self.device)
        if self.batches >= 2:  # a one-batch warm-up times nothing
            self.per_batch.append((time.perf_counter() - self.start) / (self.batches - 1))


class BareLoop:
    """A plain PyTorch loop over the same model, data path, optimizer and clipping: the baseline."""

    def __init__(self, cfg, device: str, model_overrides: dict | None = None, compiled: bool = False):
        self.cfg, self.device = cfg, device
        self.model = build_hf_model({**cfg.model, **(model_overrides or {})}, cfg.seed).to(device)
        self.forward = torch.compile(self.model) if compiled else self.model
        dataset = MappedShards(local=cfg.data.train.local, batch_size=cfg.global_batch_size, shuffle=True,
                               shuffle_seed=cfg.data.shuffle_seed, num_canonical_nodes=1)
        self.batches = self._forever(DataLoader(dataset, batch_size=cfg.global_batch_size, collate_fn=collate,
                                                drop_last=True))
        params = list(self.model.parameters())
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optimizer.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas))

    @staticmethod
    def _forever(loader: DataLoader) -> Iterator[dict]:
        while True:
            yield from loader

    def step(self) -> None:
        batch = {k: v.to(self.device) for k, v in next(self.batches).items()}
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            loss = self.forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def seconds_per_batch(self, batches: int) -> float:
        """Like ChunkClock: the first batch untimed, then the mean of the others."""
        self.step()
        sync(self.device)
        start = time.perf_counter()
        for _ in range(batches - 1):
            self.step()
        sync(self.device)
        return (time.perf_counter() - start) / (batches - 1)


def take_turns(cfg, shape: dict, device: str, compiled: bool = False) -> tuple[float, float, float]:
    """Median seconds per batch of the bare loop and of slm over alternating chunks, both compiled or both eager; the
    device's bf16 peak FLOP/s as SpeedMonitor takes it (0 on CPU)."""
    bare = BareLoop(cfg, device, compiled=compiled)
    with composer_workarounds.applied(), streaming_workarounds.applied():
        trainer = start_run(cfg).trainer
        clock = ChunkClock(device)
        trainer.state.callbacks.insert(0, clock)
        trainer.fit(duration=f"{shape['warmup']}ba")
        bare.seconds_per_batch(shape["warmup"] + 1)  # its first batch is untimed too
        clock.per_batch.clear()
        bare_times = []
        for _ in range(shape["chunks"]):
            bare_times.append(bare.seconds_per_batch(shape["chunk"]))
            trainer.fit(duration=f"{shape['chunk']}ba")
        peak = get_gpu_flops_available(trainer.state) or 0.0
        trainer.close()
    return statistics.median(bare_times), statistics.median(clock.per_batch), peak


def seconds_per_event(trainer) -> float:
    """What the engine spends on an event no callback or algorithm of a run answers (BEFORE_LOSS): pure dispatch, 13
    of which a batch has. The best of five rounds."""
    run = functools.partial(trainer.engine.run_event, Event.BEFORE_LOSS)
    return min(timeit.repeat(run, number=2000, repeat=5)) / 2000


def composer_dispatch(cfg) -> tuple[float, float]:
    """Seconds per event of Composer's own dispatch (with slm's debug-log workaround alone) and of slm's quick
    dispatch, on one trainer of `cfg` (built as a run builds it, then timed outside the run's workarounds)."""
    with composer_workarounds.applied(), streaming_workarounds.applied():
        trainer = start_run(cfg).trainer
        trainer.fit(duration="2ba")
    with composer_workarounds.engine_debug_log_when_asked():
        own = seconds_per_event(trainer)
        with composer_workarounds.quick_event_dispatch():
            quick = seconds_per_event(trainer)
    trainer.close()
    return own, quick


SYNC_RUN = {"batches": 12, "log_every": 4}  # host_syncs' run: max_duration and log_interval, in batches


def host_syncs(cfg) -> dict:
    """The calls that make the host wait for the device (bench/syncs.py) in each batch of `cfg`'s run (SYNC_RUN's
    length and log interval): per batch that logs nothing, slm's and Composer's, Composer's by call and line."""
    batches, log_every = SYNC_RUN["batches"], SYNC_RUN["log_every"]
    with composer_workarounds.applied(), streaming_workarounds.applied(), HostSyncs() as syncs:
        trainer = start_run(cfg).trainer
        trainer.state.callbacks.insert(0, ByBatch(syncs))
        trainer.fit()
        trainer.close()
    quiet = [b for b in range(2, batches + 1) if b % log_every]
    composer = syncs.summary(quiet, "composer")
    result = {"quiet_batches": len(quiet), "slm": sum(syncs.count(b, "slm") for b in quiet) / len(quiet),
              "composer": sum(composer.values()) / len(quiet),
              "composer_calls": {f"{call} at {where}": n / len(quiet) for (call, where), n in composer.items()}}
    print(f"  host syncs in a batch that logs nothing: slm {result['slm']:.1f}, Composer {result['composer']:.1f} "
          f"({', '.join(result['composer_calls'])})", flush=True)
    return result


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


def mamba_paths(cfg_for, name: str, shape: dict, device: str) -> dict:
    """Tokens/s of Mamba's fast path against its fallback, bare loop, same model and data."""
    seq_len = shape["seq_len"]
    if device == "cpu":  # one sequence: the sequential path is slow
        one = cfg_for(name, shape, ["global_batch_size=1"])
        fast = seq_len / BareLoop(one, device).seconds_per_batch(3)
        slow = seq_len / BareLoop(one, device, {"use_mambapy": False}).seconds_per_batch(2)
        return {"fast": "mambapy", "slow": "sequential", "batch": 1, "fast_tok_s": fast, "slow_tok_s": slow}
    if not mamba_kernels_available():
        return {"fast": "mamba-ssm", "slow": "mambapy", "skipped": "mamba-ssm / causal-conv1d not installed "
                "(pip install -e '.[cuda]')"}
    cfg = cfg_for(name, shape, [])
    tokens = shape["batch"] * seq_len
    fast = tokens / BareLoop(cfg, device).seconds_per_batch(shape["chunk"])
    with without_mamba_kernels():
        slow = tokens / BareLoop(cfg, device).seconds_per_batch(shape["chunk"])
    return {"fast": "mamba-ssm", "slow": "mambapy", "batch": shape["batch"], "fast_tok_s": fast, "slow_tok_s": slow}


def bench_model(name: str, shape: dict, cfg_for, device: str) -> dict:
    cfg = cfg_for(name, shape, [])
    tokens = shape["batch"] * shape["seq_len"]
    bare, ours, peak = take_turns(cfg, shape, device)
    loader_batches = max(5, 1000 // shape["batch"])
    loader = time_loader(cfg, shape["batch"], loader_batches, 2)
    model = build_hf_model(dict(cfg.model), cfg.seed)
    result = {"model": name, "class": cfg.model["class"], "params": count_parameters(model),
              "bare_ms": bare * 1e3, "slm_ms": ours * 1e3, "framework_ms": (ours - bare) * 1e3,
              "bare_tok_s": tokens / bare, "slm_tok_s": tokens / ours,
              "loader_samples_s": shape["batch"] * loader_batches / loader, "train_samples_s": shape["batch"] / ours,
              "mfu": flops_per_token(model, shape["seq_len"]) * tokens / ours / peak if peak else None}
    print(f"  {name:10s} bare loop {result['bare_ms']:8.2f} ms/batch   slm {result['slm_ms']:8.2f} ms/batch   "
          f"framework {result['framework_ms']:+.2f} ms/batch   slm / bare = {bare / ours:.3f}"
          + (f"   MFU {result['mfu']:.1%}" if result["mfu"] else ""), flush=True)
    print(f"  {name:10s} data loader alone {result['loader_samples_s']:9,.0f} samples/s   training consumes "
          f"{result['train_samples_s']:9,.1f} samples/s   loader / training = "
          f"{result['loader_samples_s'] / result['train_samples_s']:,.1f}", flush=True)
    if shape.get("compile"):
        bare_compiled, ours_compiled, _ = take_turns(cfg_for(name, shape, ["compile=true"]), shape, device,
                                                        compiled=True)
        result["compiled"] = {"bare_ms": bare_compiled * 1e3, "slm_ms": ours_compiled * 1e3}
        print(f"  {name:10s} compiled: bare loop {bare_compiled * 1e3:8.2f} ms/batch   slm {ours_compiled * 1e3:8.2f} "
              f"ms/batch   slm compiled / bare eager = {bare / ours_compiled:.3f}   slm / bare, both compiled = "
              f"{bare_compiled / ours_compiled:.3f}", flush=True)
    if cfg.model["class"] == "mamba":
        paths = result["mamba_paths"] = mamba_paths(cfg_for, name, shape, device)
        if "skipped" in paths:
            print(f"  {name:10s} mamba-ssm kernels: {paths['skipped']}")
        else:
            print(f"  {name:10s} mamba paths, batch {paths['batch']}: {paths['fast']} {paths['fast_tok_s']:9,.0f} "
                  f"tok/s   {paths['slow']} {paths['slow_tok_s']:9,.0f} tok/s   {paths['fast']} / {paths['slow']} = "
                  f"{paths['fast_tok_s'] / paths['slow_tok_s']:.1f}")
    return result


def runs_at_once(name: str, overrides: list[str], batches: int) -> dict:
    """Wall seconds for two runs of `name` (`batches` each) one after the other, each `python -m slm.cluster.launch`
    with every core, then side by side as `slm sweep --per-device 2` starts them (`python -m slm.cluster.launch ...
    --next ...`: the cores split between them): what a suite gains from placing several small runs on one machine.
    Start-up included."""

    def run(names: list[str]) -> float:
        runs = [[str(REPO / "yamls" / f"{name}.yaml"), *overrides, f"run_name=bench-{run}", f"max_duration={batches}ba"]
                for run in names]
        command = [sys.executable, "-m", "slm.cluster.launch", str(REPO / "slm" / "train.py"),
                   *[arg for i, args in enumerate(runs) for arg in (["--next"] if i else []) + args]]
        start = time.perf_counter()
        if subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode:
            raise SystemExit(f"a run of {name} failed: {' '.join(command)}")
        return time.perf_counter() - start

    after = run(["a1"]) + run(["a2"])
    together = run(["b1", "b2"])
    result = {"model": name, "batches": batches, "runs": 2, "one_after_the_other_s": after, "together_s": together}
    print(f"  {name:10s} two runs of {batches} batches: one after the other {after:6.1f} s, side by side "
          f"{together:6.1f} s   throughput side by side / one after the other = {after / together:.2f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: floor suite on CPU, gpu on a GPU")
    parser.add_argument("--models", nargs="+", help="suite yamls to time instead of the shape's own")
    parser.add_argument("--chunks", type=int, help="chunks per side (default: the shape's)")
    parser.add_argument("--quick", action="store_true", help="two short chunks per side: checks the script, not "
                        "the figures")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows of the floor shape "
                        "(torch.compile takes seconds for llama-50k, about two minutes for mamba-50k on 2 cores)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = {name: dict(SHAPES[name]) for name in args.shapes or (["gpu"] if device == "cuda" else ["floor", "suite"])}
    for shape in shapes.values():
        shape["models"] = args.models or shape["models"]
        shape["chunks"] = args.chunks or (2 if args.quick else shape["chunks"])
        shape["compile"] = shape.get("compile", False) and not args.no_compile
        if args.quick:
            shape.update(warmup=2, chunk=min(shape["chunk"], 3))

    root = Path(tempfile.mkdtemp(prefix="slm-bench-train-"))
    results = []
    try:
        print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
        for shape_name, shape in shapes.items():
            data = root / f"seq{shape['seq_len']}"
            if not data.exists():  # enough samples for several batches of the shape per epoch
                make_data(data, 2000 if args.quick else max(4000, shape["batch"] * shape["seq_len"] // 10), 4096,
                          shape["seq_len"])

            def overrides_for(shape: dict, extra: list[str], data: Path = data) -> list[str]:
                return [f"save_folder={root}/ckpt/{{run_name}}", "save_interval=0ba", "early_checkpoints=0",
                        "eval_interval=0ba", f"global_batch_size={shape['batch']}",
                        f"data.train.local={data / 'mds/train'}", f"data.eval.local={data / 'mds/validation'}",
                        f"tokenizer={data / 'tok'}", *extra]

            def cfg_for(name: str, shape: dict, extra: list[str]):
                return load_config(REPO / "yamls" / f"{name}.yaml",
                                   [f"run_name=bench-{name}-{shape['seq_len']}", *overrides_for(shape, extra)])

            precision = "amp_bf16" if device == "cuda" else "fp32"
            print(f"{shape_name}: {shape['batch']} x {shape['seq_len']} tokens, {precision}; {shape['chunks']} "
                  f"chunks of {shape['chunk']} batches per side, taking turns, after {shape['warmup']} warm-up",
                  flush=True)
            models = [bench_model(name, shape, cfg_for, device) for name in shape["models"]]
            entry = {"shape": shape_name, **{k: v for k, v in shape.items() if k not in ("models", "together")},
                     "precision": precision, "models": models}
            if shape.get("together") and device == "cpu":
                entry["together"] = runs_at_once(shape["together"], overrides_for(shape, []),
                                                 30 if args.quick else 400)
            if shape_name == "floor":
                entry["host_syncs"] = host_syncs(cfg_for(shape["models"][0], shape, [
                    f"max_duration={SYNC_RUN['batches']}ba", f"log_interval={SYNC_RUN['log_every']}ba"]))
                own, quick = composer_dispatch(cfg_for(shape["models"][0], shape, []))
                entry["dispatch_us"] = {"composer": own * 1e6, "slm": quick * 1e6}
                print(f"  event dispatch: Composer's {own * 1e6:.1f} us an event, slm's {quick * 1e6:.1f} us "
                      f"(13 events a batch)", flush=True)
            results.append(entry)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"device": device, "gpu": torch.cuda.get_device_name() if device == "cuda"
                                         else None, "torch": torch.__version__, "shapes": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
