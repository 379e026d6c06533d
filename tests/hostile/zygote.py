"""The hostile-input harness's fork server: imports slm and its stack once, then runs each job it is sent in a child
forked for it, so that thousands of commands cost what their own work costs, not seconds of imports each.

A job (one JSON line on stdin) names a command and the folder to run it from. The child runs it as the real entry
points do (`slm.cli.main`, slm/train.py's `train_command`, or calls of the Python API), its stdout and stderr in
files, and reports how much its resident memory grew (its peak, reset at the start, less where it started). This
process watches the child: past `memory_cap` bytes of growth, or `timeout` seconds, it is killed. One JSON line on
stdout answers each job: the exit status, the growth, and whether it was killed.

Started by tests/hostile/harness.py with the environment every command gets (the outside home, its secrets, the
Hub double on HOSTILE_HUB_ROOT: each child points it at its variant's copy).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "hub_double"))

from folder_hub import install  # noqa: E402

API = install(os.environ["HOSTILE_HUB_ROOT"])

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import slm  # noqa: E402, F401
import slm.analysis.batches  # noqa: E402, F401
import slm.analysis.dynamics  # noqa: E402, F401
import slm.analysis.evaluate  # noqa: E402, F401
import slm.analysis.logprobs  # noqa: E402, F401
import slm.analysis.plot  # noqa: E402, F401
import slm.analysis.suite  # noqa: E402, F401
import slm.analysis.verify  # noqa: E402, F401
import slm.cli  # noqa: E402
import slm.training.trainer  # noqa: E402
from slm.core.errors import SlmError  # noqa: E402

POLL = 0.02  # seconds between looks at a child's memory


def status_field(pid: int | str, field: str) -> int:
    """Return a /proc/PID/status field in bytes (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def api_open(target: str) -> None:
    """What a notebook does with a suite: its runs, checkpoints, metrics, a checkpoint's tokenizer and model, and a
    run folder's batches."""
    run = slm.open(target).runs[0]
    print(repr(run))
    print([(c.label, c.tokens) for c in run.checkpoints])
    print(run.metrics().to_string())
    newest = run.checkpoints[-1]
    print(len(newest.tokenizer()), sum(p.numel() for p in newest.model().parameters()))
    if run.folder is not None:
        print(run.batches(1).to_string())


def run_job(job: dict) -> int:
    """Run the job's command here (the child) and return its exit status."""
    kind, args = job["command"][0], job["command"][1:]
    if kind == "slm":
        return slm.cli.main(args)
    if kind == "train":
        configs = [a for a in args if "=" not in a]
        return slm.training.trainer.train_command(configs, [a for a in args if "=" in a])
    try:
        {"open": api_open}[kind](*args)
    except SlmError as e:
        print(f"api: error: {e}", file=sys.stderr)
        return 1
    return 0


def child(job: dict) -> None:
    """The forked child: run the job with its output in files, report its memory growth, exit."""
    status = 99
    try:
        os.chdir(job["cwd"])
        for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        Path(job["stdin"]).write_text("y\n" * 100)  # what a careless user answers to any prompt
        os.dup2(os.open(job["stdin"], os.O_RDONLY), 0)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        API.root = Path(job["hub"])
        os.environ.update(job.get("env", {}))
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident size starts again from here
        start = status_field("self", "VmRSS")
        try:
            status = run_job(job)
        except SystemExit as e:  # argparse
            status = e.code if isinstance(e.code, int) else 1
        Path(job["report"]).write_text(json.dumps({"growth": status_field("self", "VmHWM") - start}))
    except BaseException:  # noqa: BLE001 - reported as the command's traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status if isinstance(status, int) else 1)


def supervise(pid: int, job: dict) -> dict:
    """Wait for the child, killing it past its memory cap or its time; its answer."""
    start, base, peak, killed = time.monotonic(), status_field(pid, "VmRSS"), 0, None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        peak = max(peak, status_field(pid, "VmRSS") - base)
        if peak > job["memory_cap"] or time.monotonic() - start > job["timeout"]:
            killed = "memory" if peak > job["memory_cap"] else "time"
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            status = 9
            break
        time.sleep(POLL)
    report = Path(job["report"])
    growth = json.loads(report.read_text())["growth"] if report.is_file() else peak
    code = os.waitstatus_to_exitcode(status) if not killed else -9
    return {"status": code, "growth": max(growth, peak), "killed": killed,
            "seconds": round(time.monotonic() - start, 2)}


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(job)
        print(json.dumps(supervise(pid, job)), flush=True)


if __name__ == "__main__":
    main()
