"""A scheduler's warning signal: checkpoint at the next batch, exit 75, and the next start resumes bitwise."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from test_train import metric_rows, wait_for

from conftest import REPO, assert_bitwise_equal, final_state, resumed_at, train, train_cmd, write_yaml

EXIT_PREEMPTED = 75


def ranks_of(launcher: subprocess.Popen) -> dict[int, int]:
    """{global rank: pid} of the training processes `composer -n N` started."""
    ranks = {}
    for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(int(v.split(b"=")[1]) for v in environ if v.startswith(b"RANK="))
        ranks[rank] = int(pid)
    return ranks


def signal_mid_run(cmd: list[str], folder: Path, sig: signal.Signals, procs: int) -> tuple[int, str]:
    """Start training, send `sig` to the last rank the moment checkpoint 4 appears; (exit status, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (folder / "ep0-ba4-rank0.pt").exists() or proc.poll() is not None)
        if procs > 1:
            wait_for(lambda: len(ranks_of(proc)) == procs)
        os.kill(ranks_of(proc)[procs - 1] if procs > 1 else proc.pid, sig)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, stderr


@pytest.mark.parametrize("procs, sig", [(1, signal.SIGUSR1), (2, signal.SIGTERM)], ids=["1 process", "2 processes"])
def test_signal_checkpoints_stops_and_resumes_bitwise(tmp_path, shards, procs, sig):
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    train(config, "run_name=ref", procs=procs)
    folder = tmp_path / "ckpt" / "pre"
    cmd = train_cmd(config, "run_name=pre", procs=procs)

    status, stderr = signal_mid_run(cmd, folder, sig, procs)
    assert status == EXIT_PREEMPTED, stderr[-3000:]
    cause = sig.name if procs == 1 else "a signal to another process"  # rank 0 was not signalled itself
    stopped = re.search(rf"stopped at batch (\d+) on {cause}, checkpoint saved", stderr)
    assert stopped, stderr[-3000:]
    batch = int(stopped.group(1))
    assert 4 <= batch < 16
    assert final_state(folder)["timestamp"]["Timestamp"]["batch"] == batch  # the checkpoint at the stop
    rows = metric_rows(folder / "metrics.jsonl")
    assert [r["batch"] for r in rows] == list(range(1, batch + 1))
    assert all("metrics/eval/CrossEntropy" not in r for r in rows if r["batch"] not in (8,))  # no early final eval

    last = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert last.returncode == 0, last.stderr[-3000:]
    assert resumed_at(last) == batch
    assert_bitwise_equal(final_state(tmp_path / "ckpt" / "ref"), final_state(folder))
    rows = metric_rows(folder / "metrics.jsonl")
    assert [r["batch"] for r in rows] == list(range(1, 17))
    assert [r["batch"] for r in rows if "metrics/eval/CrossEntropy" in r] == [8, 16]
