"""Resume time at batch 10 against batch 10,000: flat, because Streaming restores its position in the
data instead of replaying the batches before it.

Trains demo-llama with `slm/train.py` at batch size 1 to batch 10 and to batch 10,000 (still inside
the first epoch: 10,000 samples to skip), then times, in this process, what a restart does before it
trains again: build the Trainer (autoresume loads the checkpoint, the StreamingDataset takes its
position) and train one batch. Each resume runs on a fresh copy of the run folder, --repeats times;
the median is reported. For scale it also times what replaying would cost: iterating the same data
loader through the batches before batch 10,000, as a loader without a resumable state must.
Goal: resume at 10,000 / resume at 10 <= 1.2.

    python bench/resume.py [--far 10000] [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from composer import Callback, Logger, State

from slm.core.config import load_config
from slm.training.trainer import start_run

from benchlib import REPO, machine, make_data, time_loader

CONFIG = REPO / "yamls" / "demo-llama.yaml"
NEAR = 10


def overrides(root: Path, run_name: str, max_batches: int) -> list[str]:
    return [f"run_name={run_name}", f"save_folder={root}/ckpt/{{run_name}}", f"max_duration={max_batches}ba",
            "global_batch_size=1", "eval_interval=0ba", "early_checkpoints=0", "log_interval=100000ba",
            "scheduler.name=constant",  # the stopped run is continued one batch: a schedule decayed to 0 is refused
            f"save_interval={max_batches}ba", f"data.train.local={root}/mds/train",
            f"data.eval.local={root}/mds/validation"]


def train_to(root: Path, batches: int) -> None:
    """An ordinary run to `batches`, which saves its checkpoint there."""
    proc = subprocess.run([sys.executable, "slm/train.py", str(CONFIG), *overrides(root, f"to-{batches}", batches)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"training to batch {batches} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


class FirstBatchEnd(Callback):
    """When the first batch after the resume has been trained (the final checkpoint is not timed)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def batch_end(self, state: State, logger: Logger) -> None:
        self.at = self.at or time.perf_counter()


def time_resume(root: Path, batches: int, attempt: int) -> float:
    """Seconds from building the Trainer on a copy of the run stopped at `batches` to one more batch trained."""
    name = f"to-{batches}-resume{attempt}"
    shutil.copytree(root / "ckpt" / f"to-{batches}", root / "ckpt" / name)
    cfg = load_config(CONFIG, overrides(root, name, batches + 1))
    first_batch = FirstBatchEnd()
    start = time.perf_counter()
    trainer = start_run(cfg).trainer
    trainer.state.callbacks.append(first_batch)
    trainer.fit()
    reached = int(trainer.state.timestamp.batch)
    trainer.close()
    if reached != batches + 1 or first_batch.at is None:
        raise SystemExit(f"the run stopped at batch {batches} resumed to batch {reached}, not {batches + 1}")
    return first_batch.at - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--far", type=int, default=10_000, help="the late resume point (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed resumes per point (default: %(default)s)")
    parser.add_argument("--docs", type=int, default=20_000, help="stories in the corpus; at seq_len 128 they must "
                        "give more than --far training samples (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="slm-bench-resume-"))
    try:
        make_data(root, args.docs, 1024, 128)
        samples = sum(s["samples"] for s in json.loads((root / "mds/train/index.json").read_text())["shards"])
        if samples <= args.far:
            raise SystemExit(f"{samples} training samples: batch {args.far} would not be in the first epoch; "
                             "raise --docs")
        print(f"machine: {machine()}")
        for batches in (NEAR, args.far):
            start = time.perf_counter()
            train_to(root, batches)
            print(f"  trained to batch {batches:,} in {time.perf_counter() - start:.0f} s")
        time_resume(root, NEAR, -1)  # warm-up: the first Trainer in a process pays one-off costs
        times: dict[int, list[float]] = {NEAR: [], args.far: []}
        for attempt in range(args.repeats):
            for batches in times:
                times[batches].append(time_resume(root, batches, attempt))
        near, far = (statistics.median(times[b]) for b in (NEAR, args.far))
        replay = time_loader(load_config(CONFIG, overrides(root, "replay", args.far)), 1, args.far)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"  resume at batch {NEAR:>6,}: {near:5.2f} s (median of {args.repeats})")
    print(f"  resume at batch {args.far:>6,}: {far:5.2f} s   / resume at batch {NEAR} = {far / near:.2f} "
          "(goal <= 1.2)")
    print(f"  replaying the {args.far:,} batches instead would add {replay:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"near": NEAR, "far": args.far, "samples": samples, "seconds": times,
                                         "near_s": near, "far_s": far, "replay_s": replay}, indent=2) + "\n")


if __name__ == "__main__":
    main()
