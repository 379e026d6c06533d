"""A signal to one rank: every rank stops at the same batch end with a checkpoint, exits 75, and the next
start resumes bitwise. (One process, and the signals as the schedulers send them: tests/test_jobs.py.)"""

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

pytestmark = pytest.mark.train


def ranks_of(launcher: subprocess.Popen) -> dict[int, int]:
    """{global rank: pid} of the training processes `composer -n N` started."""
    ranks = {}
    for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(int(v.split(b"=")[1]) for v in environ if v.startswith(b"RANK="))
        ranks[rank] = int(pid)
    return ranks


def test_signal_to_one_rank_stops_all_at_one_checkpoint_and_resumes_bitwise(tmp_path, shards):
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    train(config, "run_name=ref", procs=2)
    folder = tmp_path / "ckpt" / "pre"
    cmd = train_cmd(config, "run_name=pre", procs=2)

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:  # SIGTERM to rank 1 alone, the moment checkpoint 4 appears
        wait_for(lambda: (folder / "ep0-ba4-rank0.pt").exists() and len(ranks_of(proc)) == 2 or proc.poll() is not None)
        os.kill(ranks_of(proc)[1], signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    stopped = re.search(r"stopped at batch (\d+) on a signal to another process, checkpoint saved", stderr)
    assert stopped, stderr[-3000:]  # rank 0 reports it: it was not signalled itself
    batch = int(stopped.group(1))
    assert 4 <= batch < 16
    assert final_state(folder)["timestamp"]["Timestamp"]["batch"] == batch  # the checkpoint at the stop
    rows = metric_rows(folder / "metrics.jsonl")
    assert [r["batch"] for r in rows] == list(range(1, batch + 1))
    assert [r["batch"] for r in rows if "metrics/eval/CrossEntropy" in r] == [8] * (batch >= 8)  # no early final eval

    last = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert last.returncode == 0, last.stderr[-3000:]
    assert resumed_at(last) == batch
    assert_bitwise_equal(final_state(tmp_path / "ckpt" / "ref"), final_state(folder))
    rows = metric_rows(folder / "metrics.jsonl")
    assert [r["batch"] for r in rows] == list(range(1, 17))
    assert [r["batch"] for r in rows if "metrics/eval/CrossEntropy" in r] == [8, 16]
