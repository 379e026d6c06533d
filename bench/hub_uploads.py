"""What slow Hub uploads cost training: the training thread's time spent queueing checkpoints, against the time the
commits took, and the training loop's time against the same run without the Hub.

Trains demo-llama's shape (small data made here) for --batches batches, a checkpoint every --every, twice: with
`hub.repo` (every checkpoint and its export go up; the Hub is the folder-backed HfApi double of tests/hub_double,
each commit taking --latency seconds, as no network is reached), and without. Reported: the seconds the run says
its training thread spent queueing (staging each checkpoint and export; it never waits on a commit), the seconds of
commits, and each run's training loop time (Composer's time/train at the last batch).
Goal: queueing < one commit's latency in all (the loop's ratio is reported, not held to a goal: it is the staging
plus the upload thread's share of the interpreter).

    python bench/hub_uploads.py [--batches 192] [--every 16] [--latency 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchlib import REPO, machine, report, scratch_with_data

CONFIG = REPO / "yamls" / "demo-llama.yaml"
HOOKS = REPO / "tests" / "hooks"  # installs the Hub double in the training process (SLM_TEST_HUB_ROOT)
sys.path.insert(0, str(REPO / "tests" / "hub_double"))
from folder_hub import FolderHfApi  # noqa: E402


def train(root: Path, name: str, args: argparse.Namespace, hub: Path | None) -> tuple[float, float, str]:
    """Train one run; (its training loop's seconds, the process's wall seconds, its stderr)."""
    overrides = [f"run_name={name}", f"save_folder={root}/ckpt/{{run_name}}", f"max_duration={args.batches}ba",
                 f"save_interval={args.every}ba", "early_checkpoints=0", "eval_interval=0ba", "log_interval=1ba",
                 "global_batch_size=8", f"data.train.local={root}/mds/train", f"data.eval.local={root}/mds/validation"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    if hub is not None:
        overrides.append(f"hub.repo=bench/{name}")
        env.update(SLM_TEST_HUB_ROOT=str(hub), PYTHONPATH=os.pathsep.join(filter(None, [str(HOOKS),
                                                                                          env.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "slm/train.py", str(CONFIG), *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"run {name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (root / "ckpt" / name / "metrics.jsonl").read_text().splitlines()]
    loop = max(row["time/train"] for row in rows if "time/train" in row) * 3600
    return loop, wall, proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=192)
    parser.add_argument("--every", type=int, default=16, help="batches between checkpoints")
    parser.add_argument("--latency", type=float, default=2.0, help="seconds each commit takes")
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with scratch_with_data("hub", args.docs, 1024, 256) as root:
        hub = root / "hub"
        hub.mkdir()
        (hub / "limits.json").write_text(json.dumps({"latency": args.latency}))
        bare_loop, bare_wall, _ = train(root, "bare", args, None)
        hub_loop, hub_wall, err = train(root, "uploads", args, hub)
        spent = re.search(r"training spent ([\d.]+) s queueing (\d+) checkpoint", err)
        if not spent:
            raise SystemExit(f"the run with uploads did not say what queueing took:\n{err[-3000:]}")
        commits = len(FolderHfApi(hub).commits())
    result = {"machine": machine(), "batches": args.batches, "every": args.every, "latency": args.latency,
              "checkpoints": int(spent.group(2)), "queueing_seconds": float(spent.group(1)), "commits": commits,
              "commit_seconds": commits * args.latency,
              "loop_seconds": {"without_hub": bare_loop, "with_uploads": hub_loop},
              "wall_seconds": {"without_hub": bare_wall, "with_uploads": hub_wall}, "loop_ratio": hub_loop / bare_loop}
    print(f"{result['checkpoints']} checkpoints and their exports uploaded in {commits} commits of {args.latency} s: "
          f"the training thread spent {result['queueing_seconds']:.2f} s queueing them; training loop "
          f"{hub_loop:.1f} s with uploads, {bare_loop:.1f} s without ({result['loop_ratio']:.2f}x); whole run "
          f"{hub_wall:.1f} s vs {bare_wall:.1f} s (the end waits for the last uploads)")
    report(result, args.json)


if __name__ == "__main__":
    main()
