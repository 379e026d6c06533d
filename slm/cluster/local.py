"""A sweep on this machine (`slm sweep ... --local -j K`): the grid's runs K at a time, picked up again after a stop.

Each run is `python -m slm.cluster.launch slm/train.py ARGS` (one training process per GPU, or one on the CPU),
started in a session of its own with its output in LOGS/RUN_NAME.log; on a CPU-only machine each of the K slots is
pinned to its share of the cores (OMP_NUM_THREADS set to it), with GPUs the K runs share them. A run whose folder
says it finished at the same max_duration is skipped; any other resumes from its newest checkpoint (the same
run_name). One line a run says where it stands (redrawn in a terminal, a new line at each change in a log).

Ctrl-C (or SIGINT) stops every running run at its batch end with a checkpoint and starts no new one; a second stops
them at once. SIGTERM, SIGUSR1 and SIGUSR2 (a scheduler's warning) stop them with a checkpoint too. The exit status:
0 when every run finished, 130 after a Ctrl-C, 75 after the other signals, else 1 (a run failed: its log says why).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from slm.cluster.launch import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    SIGNALS,
    core_shares,
    gpus_on_this_node,
    granted_cores,
)
from slm.core.config import TrainConfig, load_config, load_saved_config
from slm.core.errors import SlmError
from slm.core.foreign import read_json
from slm.core.run_folder import STATE_FILE, check_run_state

if TYPE_CHECKING:
    from slm.cluster.sweep import Task  # sweep.py starts this module

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"
POLL_SECONDS = 0.5


def finished(cfg: TrainConfig) -> bool:
    """Whether the run `cfg` names finished at this max_duration (its run-state.json and saved config.yaml)."""
    folder = cfg.folder
    try:
        state = check_run_state(read_json(folder / STATE_FILE, "run state"), str(folder / STATE_FILE))
        return state["state"] == "finished" and \
            load_saved_config(folder / "config.yaml").max_duration == cfg.max_duration
    except (FileNotFoundError, SlmError):
        return False


@dataclass
class LocalRun:
    """One run of the sweep on this machine: its task, config, process and where it stands."""

    task: Task
    cfg: TrainConfig
    log: Path
    status: str = "waiting"
    proc: subprocess.Popen | None = None
    slot: int | None = None
    exit_status: int | None = None
    batch: int = 0

    def progress(self) -> str:
        """Return the run's line: name, state, batch reached, log."""
        if self.proc is not None and self.exit_status is None:
            self.batch = _last_batch(self.cfg.folder) or self.batch
            return f"{self.task.run_name}: running, batch {self.batch} of {self.cfg.max_duration} (log: {self.log})"
        return f"{self.task.run_name}: {self.status}" + (f" (log: {self.log})" if self.proc is not None else "")


def _last_batch(folder: Path) -> int | None:
    """Return the newest batch of the run's metrics.jsonl (its last line), None where there is none yet."""
    try:
        with open(folder / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().splitlines()
        return int(json.loads(lines[-1])["batch"]) if lines else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Board:
    """The runs' lines on `stream`: redrawn in place in a terminal, else a line printed at each change."""

    def __init__(self, stream: TextIO):
        self.stream, self.terminal, self.drawn, self.said = stream, stream.isatty(), 0, {}

    def show(self, runs: list[LocalRun]) -> None:
        """Show each run's line: redrawn in place in a terminal, else printed for each run whose state changed."""
        lines = [run.progress() for run in runs]
        if self.terminal:
            self.stream.write(f"\x1b[{self.drawn}F" * bool(self.drawn) + "".join(f"\x1b[2K{line}\n" for line in lines))
            self.drawn = len(lines)
        else:
            for run, line in zip(runs, lines, strict=True):
                said = line if run.exit_status is not None or run.proc is None else f"{run.task.run_name}: running"
                if self.said.get(run.task.run_name) != said:
                    self.stream.write(f"slm sweep: {line}\n")
                    self.said[run.task.run_name] = said
        self.stream.flush()


class Stops:
    """The signals that stop the sweep: each is passed on to every running run's session (a second Ctrl-C too,
    which stops them at once); once any came, no run starts."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.running: list[subprocess.Popen] = []
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, *SIGNALS)}

    def restore(self) -> None:
        """Give the signals back to their handlers of before."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        """Record a stopping signal and pass it on to the process group of every run still running."""
        self.received.append(signum)
        for proc in self.running:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def exit_status(self) -> int | None:
        """Return the sweep's status for the signals received (None: none came)."""
        if not self.received:
            return None
        return EXIT_INTERRUPTED if signal.SIGINT in self.received else EXIT_PREEMPTED


def run_locally(tasks: list[Task], jobs: int, logs: Path, stream: TextIO = sys.stderr) -> int:
    """Train `tasks` on this machine, `jobs` at a time (the module's docstring); return the exit status."""
    if jobs < 1:
        raise SlmError(f"-j {jobs}: run at least 1 run at a time")
    gpus = gpus_on_this_node(os.environ)
    shares = [[] for _ in range(jobs)] if gpus else core_shares(granted_cores(os.environ), jobs)
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SlmError(f"cannot write the run logs to {logs}: {e.strerror or e}") from e
    runs = [LocalRun(task, load_config(list(task.configs), list(task.overrides)), logs / f"{task.run_name}.log")
            for task in tasks]
    for run in runs:
        if finished(run.cfg):
            run.status = "skipped: finished before"
    where = f"{gpus} GPU(s) shared" if gpus else "CPU cores " + " | ".join(",".join(map(str, s)) for s in shares)
    stream.write(f"slm sweep: {len(runs)} runs on this machine, {jobs} at a time ({where})\n")
    stops = Stops()
    try:
        _run_all(runs, shares, stops, Board(stream))
    finally:
        stops.restore()
    statuses = [run.exit_status for run in runs if run.exit_status is not None]
    if stops.exit_status() is not None:
        stream.write("slm sweep: stopped; the same command resumes the runs not finished\n")
        return stops.exit_status()
    failed = [run.task.run_name for run in runs if run.exit_status not in (None, 0)]
    if failed:
        stream.write(f"slm sweep: {len(failed)} run(s) failed ({', '.join(failed)}): their logs say why; the same "
                     "command resumes them\n")
        return 1
    stream.write(f"slm sweep: all {len(runs)} runs finished ({len(statuses)} trained now)\n")
    return 0


def _run_all(runs: list[LocalRun], shares: list[list[int]], stops: Stops, board: Board) -> None:
    """Start the waiting runs as slots free up (none once a stop came) and follow them until every started one
    ended."""
    free = list(range(len(shares)))
    waiting = [run for run in runs if run.status == "waiting"]
    while True:
        while free and waiting and not stops.received:
            _start(waiting.pop(0), free.pop(0), shares, stops)
        for run in runs:
            if run.proc is not None and run.exit_status is None and run.proc.poll() is not None:
                run.exit_status = run.proc.returncode
                run.status = _ended(run.exit_status, _last_batch(run.cfg.folder))
                free.append(run.slot)
        board.show(runs)
        if all(run.proc is None or run.exit_status is not None for run in runs) and (stops.received or not waiting):
            return
        time.sleep(POLL_SECONDS)


def _start(run: LocalRun, slot: int, shares: list[list[int]], stops: Stops) -> None:
    """Start `run` in `slot`, pinned to the slot's cores (where the CPU is split), in a session of its own."""
    share = shares[slot]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(len(share))} if share else {})}
    with open(run.log, "ab") as log:
        run.proc = subprocess.Popen(
            [sys.executable, "-m", "slm.cluster.launch", str(TRAIN_SCRIPT), *run.task.args], env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, share)) if share else None)
    run.slot, run.status = slot, "running"
    stops.running.append(run.proc)


def _ended(status: int, batch: int | None) -> str:
    """Say how a run's process ended."""
    at = f" at batch {batch}" if batch is not None else ""
    if status == 0:
        return f"finished{at}"
    if status in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
        return f"stopped{at} with a checkpoint (exit {status})"
    return f"failed{at} (exit {status})"
