"""Launching: Composer's launcher flags derived from the scheduler's environment, and several runs sharing a node
(one run across two hosts: tests/cluster/test_hosts.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from slm.cluster.launch import (
    EXIT_PREEMPTED,
    Launch,
    core_shares,
    expand_hostlist,
    from_environment,
    gpus_on_this_node,
    split_runs,
)
from slm.core.errors import SlmError

from helpers import REPO, Hold, Started, assert_bitwise_equal, final_state, run_cmd, write_yaml


def test_expand_slurm_hostlists():
    assert expand_hostlist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_hostlist("node7") == ["node7"]
    assert expand_hostlist("a[8-10]") == ["a8", "a9", "a10"]


def test_slurm_multi_node():
    env = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_NODEID": "1"}
    launch = from_environment(env, gpus=4, hostname="gpu08")
    assert launch == Launch(nproc=4, nodes=2, node_rank=1, master_addr="gpu07", master_port=29500 + 1234)
    assert launch.composer_args() == ["-n", "4", "--world_size", "8", "--node_rank", "1", "--master_addr", "gpu07",
                                      "--master_port", "30734"]


def test_sge_parallel_environment(tmp_path):
    hostfile = tmp_path / "pe_hostfile"
    hostfile.write_text("node1.cluster 1 all.q@node1.cluster UNDEFINED\n"
                        "node2.cluster 1 all.q@node2.cluster UNDEFINED\n")
    env = {"JOB_ID": "77", "PE_HOSTFILE": str(hostfile), "MASTER_PORT": "4000"}
    assert from_environment(env, gpus=0, hostname="node2") == Launch(1, 2, 1, "node1.cluster", 4000)
    with pytest.raises(SlmError, match="this host \\(node9\\) is not among the job's hosts"):
        from_environment(env, gpus=0, hostname="node9")
    # Another host's launcher, started by `qrsh -inherit` (jobs/train.sh): no hostfile there, the hosts given
    others = {"JOB_ID": "77", "SLM_PE_HOSTS": "node1.cluster node2.cluster ", "MASTER_PORT": "4000"}
    assert from_environment(others, gpus=0, hostname="node2") == Launch(1, 2, 1, "node1.cluster", 4000)


def test_single_node_and_cpu_only():
    # one node: a free port, picked by Composer's launcher (two launches on one machine never share one)
    assert from_environment({}, gpus=0, hostname="laptop") == Launch(1, 1, 0, "127.0.0.1", None)
    assert "--master_port" not in Launch(1, 1, 0, "127.0.0.1", None).composer_args()
    assert from_environment({"SLURM_JOB_ID": "5", "SLURM_JOB_NUM_NODES": "1"}, gpus=2, hostname="n") == \
        Launch(2, 1, 0, "127.0.0.1", None)
    assert from_environment({"MASTER_PORT": "4000"}, gpus=0, hostname="n").master_port == 4000
    assert gpus_on_this_node({"CUDA_VISIBLE_DEVICES": "0,1"}) == 2
    assert gpus_on_this_node({"CUDA_VISIBLE_DEVICES": ""}) == 0
    # granted but not hidden from us (Slurm without device binding, SGE's -l gpu=N): at most the grant
    assert gpus_on_this_node({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_GPUS_ON_NODE": "2"}) == 2
    assert gpus_on_this_node({"CUDA_VISIBLE_DEVICES": "0,1", "SLM_GPUS": "1"}) == 1
    assert gpus_on_this_node({"CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "1"}) == 0  # none visible: CPU


def test_runs_sharing_a_node_split_its_cores_and_ports(tmp_path):
    assert split_runs(["t.py", "a.yaml", "k=1", "--next", "b.yaml"]) == [["t.py", "a.yaml", "k=1"], ["t.py", "b.yaml"]]
    with pytest.raises(SlmError, match="run 2 of 3 has no arguments: give each --next a CONFIG.yaml"):
        split_runs(["t.py", "a.yaml", "--next", "--next", "c.yaml"])
    assert core_shares([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    with pytest.raises(SlmError, match="3 runs on a node with 2 CPU core\\(s\\) for this job"):
        core_shares([0, 1], 3)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "MASTER_PORT": "4100", "NSLOTS": "2"}
    printed = subprocess.run([sys.executable, "-m", "slm.cluster.launch", "--print", "slm/train.py", "a.yaml", "--next",
                              "b.yaml", "seed=1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    cores = sorted(os.sched_getaffinity(0))[:2]
    lines = printed.stdout.splitlines()
    assert printed.returncode == 0 and len(lines) == 2, printed.stderr
    if len(cores) == 2:
        assert lines[0] == f"MASTER_PORT=4100 OMP_NUM_THREADS=1 taskset -c {cores[0]} {sys.executable} " \
                           "-m slm.cluster.launch slm/train.py a.yaml"
        assert lines[1].startswith(f"MASTER_PORT=4101 OMP_NUM_THREADS=1 taskset -c {cores[1]} ")
        assert lines[1].endswith(" slm/train.py b.yaml seed=1")


def stopped_runs(command: list[str], runs: int, signum: int, hold: Hold) -> subprocess.CompletedProcess:
    """Run `command` in a session of its own, send `signum` to all of it (as SGE does, and srun through Slurm)
    while each of its `runs` is held at the end of batch 4, and wait for it."""
    proc = Started(command, start_new_session=True, env=hold.env)
    hold.wait(proc, processes=runs)
    os.killpg(proc.pid, signum)
    hold.release()
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.train
@pytest.mark.beside
def test_two_runs_sharing_a_node_stop_on_a_signal_and_each_resumes_bitwise(tmp_path, shards):
    """`--next` (slm sweep --per-device 2): two runs at once, each on its share of the cores. A scheduler's signal
    stops both with a checkpoint (exit 75: requeue); the same command again resumes each, ending bitwise equal to
    the same pair never interrupted (same shares, so the same thread counts)."""
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    slow = ["max_duration=48ba", "global_batch_size=32"]

    def pair(a: str, b: str) -> list[str]:
        return [sys.executable, "-m", "slm.cluster.launch", "slm/train.py", str(config), f"run_name={a}", *slow,
                "--next", str(config), f"run_name={b}", "seed=7", *slow]

    reference = run_cmd(pair("ref-a", "ref-b"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "slm launch: 2 runs share this node" in reference.stderr
    ckpt = tmp_path / "ckpt"
    threads = [json.loads((ckpt / run / "run.json").read_text())["starts"][0]["hardware"]["cpu_threads"]
               for run in ("ref-a", "ref-b")]
    assert threads == [len(share) for share in core_shares(sorted(os.sched_getaffinity(0)), 2)]

    stopped = stopped_runs(pair("a", "b"), 2, signal.SIGUSR1, Hold(tmp_path / "hold", 4))
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-3000:]
    stops = dict(re.findall(r"slm train: ([ab]): stopped at batch (\d+) on SIGUSR1, checkpoint saved", stopped.stderr))
    assert sorted(stops) == ["a", "b"] and all(4 <= int(batch) < 48 for batch in stops.values()), \
        stopped.stderr[-3000:]
    resumed = run_cmd(pair("a", "b"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for run in ("a", "b"):
        assert f"slm train: {run}: resumed at batch {stops[run]} of 48ba" in resumed.stderr, resumed.stderr[-3000:]
        assert_bitwise_equal(final_state(ckpt / f"ref-{run}"), final_state(ckpt / run))
