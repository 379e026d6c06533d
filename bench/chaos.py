"""Chaos resume: SIGKILL a training run again and again, restart it each time with the same run_name,
and check it ends tensor for tensor equal to a run never interrupted; then the same with Ctrl-C twice.

The kills cycle through four moments: right after start, the instant a checkpoint file appears
(inside its write), inside an evaluation, and at a random time once training has begun. With --procs 2 the run is
`composer -n 2` and each kill hits one rank (the launcher then stops the other). After each kill
the script checks that no process of the run is left, lists Streaming shared memory left behind
(the next start removes it), and reads where the restart resumed. Reported: kills survived,
checkpoints found corrupt at the end (must be 0), batches lost per kill (at most the work since
the newest complete checkpoint), and whether the final weights equal the uninterrupted run's.

--ctrl-c N interrupts a second run N times as a terminal does (SIGINT to its process group), twice each time:
the first at a random moment 1 to 8 batches into training, the second at once, the instant the stop's checkpoint
file appears (inside its write), or a random moment later. Each must exit 130 at once and leave every checkpoint
whole (a checkpoint being written is finished first); the next start resumes from the newest, and the end is
bitwise the same.
--busy N keeps N other processes spinning on the CPU meanwhile (the uninterrupted run included): a loaded machine.

    python bench/chaos.py [--kills 20] [--ctrl-c 10] [--busy 2] [--procs 1|2] [--config yamls/demo-llama.yaml]
                          [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from slm.core.run_folder import checkpoints, is_complete
from slm.core.shared_memory import stale_shared_memory
from slm.core.trust import unpickle_checkpoint

from benchlib import BIN, REPO, cpus_kept_busy, make_data

MOMENTS = ["start", "checkpoint", "eval", "random"]
SECOND_CTRL_C = ["at once", "inside the stop's checkpoint write", "random"]


class Run:
    """One start of the training command, its output read line by line as it comes."""

    def __init__(self, command: list[str]) -> None:
        self.proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.in_eval = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "[Eval batch=" in line:
                self.in_eval.set()

    def ranks(self) -> list[int]:
        """Pids of the training processes: the command itself, or the ranks `composer -n N` started."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return []
        return [int(c) for c in children if "slm/train.py" in Path(f"/proc/{c}/cmdline").read_text()] or []

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def resumed_at(self) -> int | None:
        for line in self.lines:
            match = re.search(r"slm train: \S+: (?:resumed at|starting at) batch (\d+)", line)
            if match:
                return int(match.group(1))
        return None


def last_batch(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in reversed(lines):
        try:
            return json.loads(line)["batch"]
        except (ValueError, KeyError):
            continue  # a row torn by the kill
    return 0


def newest_complete(folder: Path) -> int:
    return max((b for b, p in checkpoints(folder).items() if is_complete(p)), default=0)


def run_alive(tag: str) -> list[int]:
    """Pids of any process still running this run (matched by its run_name on the command line)."""
    alive = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if tag in cmdline.read_text():
                alive.append(int(cmdline.parent.name))
        except OSError:
            continue
    return alive


def kill_at(run: Run, moment: str, folder: Path, procs: int, rng: random.Random) -> str:
    """Wait for the moment, then SIGKILL one training process; returns what was hit."""
    seen = set(checkpoints(folder))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and run.proc.poll() is None:
        if moment == "start":
            time.sleep(rng.uniform(0.5, 4.0))
            break
        if moment == "checkpoint" and set(checkpoints(folder)) - seen:
            break
        if moment == "eval" and run.in_eval.is_set():
            break
        if moment == "random" and run.resumed_at() is not None:  # somewhere in training proper
            time.sleep(rng.uniform(0.2, 5.0))
            break
        time.sleep(0.002)
    ranks = run.ranks()
    victim = ranks[-1] if procs > 1 and ranks else run.proc.pid
    try:
        os.kill(victim, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        run.proc.wait(timeout=120)  # with -n 2 the launcher stops the other rank itself
    except subprocess.TimeoutExpired:
        os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
    return "one rank" if procs > 1 and ranks else "the process"


def ctrl_c_twice(run: Run, moment: str, folder: Path, rng: random.Random) -> int | None:
    """Ctrl-C at a random moment of training (1 to 8 batches in), then again at `moment`; the exit status (None: it
    never stopped)."""
    wait_for(lambda: run.resumed_at() is not None or run.proc.poll() is not None, 600)
    trained_to = (run.resumed_at() or 0) + rng.randint(1, 8)
    wait_for(lambda: last_batch(folder) >= trained_to or run.proc.poll() is not None, 600, 0.01)
    time.sleep(rng.uniform(0.0, 0.2))
    seen = set(checkpoints(folder))
    if run.proc.poll() is None:
        os.killpg(run.proc.pid, signal.SIGINT)
        try:
            wait_for(lambda: run.said("Ctrl-C again") or run.proc.poll() is not None, 120)
            if moment == "inside the stop's checkpoint write":
                wait_for(lambda: set(checkpoints(folder)) - seen or run.proc.poll() is not None, 120, 0.001)
            elif moment == "random":
                time.sleep(rng.uniform(0.0, 0.5))
        except TimeoutError:
            pass
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGINT)
    try:
        return run.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        return None


def ctrl_c_rounds(base: list[str], folder: Path, rounds: int, rng: random.Random) -> list[dict]:
    """`rounds` starts of one run, each stopped by Ctrl-C twice; what each left behind."""
    records = []
    for i in range(rounds):
        moment = SECOND_CTRL_C[i % len(SECOND_CTRL_C)]
        before = newest_complete(folder)
        run = Run([*base, f"run_name={folder.name}"])
        status = ctrl_c_twice(run, moment, folder, rng)
        records.append({"round": i + 1, "second": moment, "exit": status, "resumed_at": run.resumed_at(),
                        "complete_before": before, "reached": last_batch(folder),
                        "newest_complete": newest_complete(folder),
                        "torn": sorted(p.name for p in checkpoints(folder).values() if not is_complete(p)),
                        "left_running": run_alive(f"run_name={folder.name}"), "stale_shm": len(stale_shared_memory())})
        if status == 0:  # finished before the first Ctrl-C
            break
    return records


def equal_states(a: Path, b: Path) -> bool:
    sa, sb = (unpickle_checkpoint(p / "latest-rank0.pt")["state"] for p in (a, b))
    model = sa["model"].keys() == sb["model"].keys() and all(torch.equal(sa["model"][k], sb["model"][k])
                                                             for k in sa["model"])
    oa, ob = sa["optimizers"]["AdamW"]["state"], sb["optimizers"]["AdamW"]["state"]
    optim = all(torch.equal(oa[p][n], ob[p][n]) for p in oa for n in oa[p])
    return model and optim and sa["timestamp"]["Timestamp"]["batch"] == sb["timestamp"]["Timestamp"]["batch"]


def wait_for(predicate, timeout: float, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(interval)


def corrupt_checkpoints(folder: Path) -> list[str]:
    bad = []
    for path in checkpoints(folder).values():
        try:
            unpickle_checkpoint(path)
        except Exception:
            bad.append(path.name)
    return bad


def chaos(work: Path, config: str, overrides: list[str], kills: int, procs: int, seed: int, ctrl_c: int = 0) -> dict:
    rng = random.Random(seed)
    train = [str(BIN / "composer"), "-n", str(procs)] if procs > 1 else [sys.executable]
    base = [*train, "slm/train.py", config, f"save_folder={work}/ckpt/{{run_name}}", *overrides]
    reference = subprocess.run([*base, "run_name=reference"], cwd=REPO, capture_output=True, text=True)
    if reference.returncode:
        raise SystemExit(f"the uninterrupted run failed:\n{reference.stdout[-3000:]}{reference.stderr[-3000:]}")
    result = {"procs": procs, **sigkills(work, base, kills, procs, rng)}
    if ctrl_c:
        folder = work / "ckpt" / f"ctrl-c-{os.getpid()}"
        records = ctrl_c_rounds(base, folder, ctrl_c, rng)
        last = Run([*base, f"run_name={folder.name}"])
        last.proc.wait()
        result["ctrl_c"] = {"rounds": len(records), "records": records, "final_exit": last.proc.returncode,
                            "final_resumed_at": last.resumed_at(),
                            "bitwise_equal": last.proc.returncode == 0 and equal_states(work / "ckpt" / "reference",
                                                                                        folder)}
    return result


def sigkills(work: Path, base: list[str], kills: int, procs: int, rng: random.Random) -> dict:
    """`kills` starts of one run, each SIGKILLed at one of MOMENTS, then a last start to the end."""
    tag = f"run_name=chaos-{os.getpid()}"
    folder = work / "ckpt" / tag.split("=")[1]
    records = []
    for i in range(kills):
        moment = MOMENTS[i % len(MOMENTS)]
        run = Run([*base, tag])
        before = newest_complete(folder)
        hit = kill_at(run, moment, folder, procs, rng)
        finished = run.proc.returncode == 0
        try:  # data-loader workers notice their parent is gone within a few seconds
            wait_for(lambda: not run_alive(tag), 15)  # noqa: B023
        except TimeoutError:
            pass
        records.append({"kill": i + 1, "moment": moment, "hit": hit, "resumed_at": run.resumed_at(),
                        "reached": last_batch(folder), "newest_complete": newest_complete(folder),
                        "complete_before": before, "finished_before_kill": finished,
                        "left_running": run_alive(tag), "stale_shm": len(stale_shared_memory())})
        if finished:
            break
    expected_final = newest_complete(folder)
    last = Run([*base, tag])
    last.proc.wait()
    for record in records:
        # Work since the newest complete checkpoint is redone; each start that got as far as saying where
        # it resumed (a kill can come before) must have resumed from the newest complete checkpoint.
        record["lost"] = record["reached"] - record["newest_complete"]
        record["resumed_ok"] = record["resumed_at"] in (None, record["complete_before"])
    final_ok = last.proc.returncode == 0 and last.resumed_at() == expected_final
    return {"kills": len(records), "final_exit": last.proc.returncode,
            "final_resumed_at": last.resumed_at(),
            "survived": final_ok and all(r["resumed_ok"] for r in records),
            "corrupt": corrupt_checkpoints(folder), "bitwise_equal": last.proc.returncode == 0 and equal_states(
                work / "ckpt" / "reference", folder),
            "left_running": sorted({p for r in records for p in r["left_running"]}), "records": records}


def report(result: dict) -> str:
    rows = [f"| {r['kill']} | {r['moment']} | {r['hit']} | {r['complete_before']} | "
            f"{'-' if r['resumed_at'] is None else r['resumed_at']} | {r['reached']} | {r['newest_complete']} | "
            f"{r['lost']} | {r['stale_shm']} |" for r in result["records"]]
    lost = [r["lost"] for r in result["records"]]
    return "\n".join([
        f"### chaos, {result['procs']} process(es): {result['kills']} kills",
        "| kill | moment | SIGKILL to | newest complete checkpoint at start | resumed at (- : killed before it said) "
        "| batch reached | newest complete checkpoint after the kill | batches lost | stale shm blocks left |",
        "|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"- the final start resumed at batch {result['final_resumed_at']} and finished "
        f"(exit {result['final_exit']})",
        f"- every start resumed from the newest complete checkpoint and the run finished: {result['survived']}",
        f"- checkpoints found corrupt at the end: {len(result['corrupt'])} {result['corrupt'] or ''}",
        f"- batches lost per kill: max {max(lost, default=0)}, mean {sum(lost) / max(len(lost), 1):.1f}",
        f"- processes of the run left after a kill: {len(result['left_running'])}",
        f"- final weights and optimizer state equal to the uninterrupted run, tensor for tensor: "
        f"{result['bitwise_equal']}", *ctrl_c_report(result.get("ctrl_c"))])


def ctrl_c_report(result: dict | None) -> list[str]:
    if result is None:
        return []
    rows = [f"| {r['round']} | {r['second']} | {r['complete_before']} | "
            f"{'-' if r['resumed_at'] is None else r['resumed_at']} | {r['exit']} | {r['reached']} | "
            f"{r['newest_complete']} | {len(r['torn'])} | {r['stale_shm']} |" for r in result["records"]]
    return ["", f"### Ctrl-C twice, {result['rounds']} rounds",
            "| round | second Ctrl-C | newest complete checkpoint at start | resumed at | exit | batch reached "
            "| newest complete checkpoint after | torn checkpoints | stale shm blocks left |",
            "|---|---|---|---|---|---|---|---|---|", *rows, "",
            f"- the final start resumed at batch {result['final_resumed_at']} and finished "
            f"(exit {result['final_exit']})",
            f"- final weights and optimizer state equal to the uninterrupted run, tensor for tensor: "
            f"{result['bitwise_equal']}"]


def ctrl_c_ok(result: dict | None) -> bool:
    """Every round stopped as asked (130, or 0 if the run had finished), left nothing torn or running, and resumed
    from the newest checkpoint; the end is bitwise the uninterrupted run's."""
    if result is None:
        return True
    return result["bitwise_equal"] and all(
        r["exit"] in (0, 130) and not r["torn"] and not r["left_running"]
        and r["resumed_at"] in (None, r["complete_before"]) for r in result["records"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--ctrl-c", type=int, default=0, metavar="ROUNDS",
                        help="then ROUNDS starts of another run, each stopped by Ctrl-C twice")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="keep N other processes spinning on the CPU meanwhile")
    parser.add_argument("--procs", type=int, default=1, choices=[1, 2])
    parser.add_argument("--config", default="yamls/demo-llama.yaml")
    parser.add_argument("--seed", type=int, default=0, help="for the random kill times")
    parser.add_argument("--docs", type=int, default=4000, help="stories in the generated corpus")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="slm-chaos-") as tmp:
        work = Path(tmp)
        make_data(work / "data", args.docs, 1024, 128)
        data = [f"data.train.local={work}/data/mds/train", f"data.eval.local={work}/data/mds/validation"]
        # checkpoints and evaluations often enough that the kills find them before the run ends
        often = ["save_interval=25ba", "eval_interval=50ba"]
        with cpus_kept_busy(args.busy):
            result = chaos(work, args.config, [*data, *often, *args.overrides], args.kills, args.procs, args.seed,
                           args.ctrl_c)
    result["busy"] = args.busy
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = result["survived"] and not result["corrupt"] and result["bitwise_equal"] and not result["left_running"]
    return 0 if ok and ctrl_c_ok(result.get("ctrl_c")) else 1


if __name__ == "__main__":
    sys.exit(main())
