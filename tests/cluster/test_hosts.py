"""One run across two hosts (tests/two_hosts.sh: network namespaces of this machine, real TCP between them) under
Slurm and SGE: the job scripts' launcher per node, a time-limit signal stopping every rank on both hosts at one
batch, the requeue resuming bitwise equal to the same run on one host; a node killed mid-run, and a rendezvous
host that is not there."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from clusters import JOB_TIMEOUT, wait_until

from helpers import REPO, Hold, assert_bitwise_equal, final_state, job_log, run_slm, shown_on_failure, train, write_yaml

RUN = ["max_duration=24ba", "dist_timeout=60"]  # every wait on the other host bounded by a minute


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> tuple[Path, Path]:
    """The run on one host, `composer -n 2` (world size 2, as one process on each of two hosts): its config and
    folder."""
    root = tmp_path_factory.mktemp("hosts-reference")
    config = write_yaml(root / "tiny.yaml", shards)
    train(config, "run_name=ref", *RUN, procs=2)
    return config, root / "ckpt" / "ref"


def held_on(hold: Hold, batch: int, node: int) -> list[int]:
    """The pids of the training processes of node `node` held at `batch`."""
    pids = [int(p.name.rsplit("-", 1)[1]) for p in hold.folder.glob(f"held-{batch}-*")]
    return [pid for pid in pids if f"NODE_RANK={node}\0" in Path(f"/proc/{pid}/environ").read_text()]


class Job:
    """A scheduler's job as `Hold.wait` watches a process: `poll()` is None while it runs, else how it ended (a
    job that failed before the hold fails the test at once, not at the hold's timeout)."""

    def __init__(self, ended: Callable[[], str | None]) -> None:
        self.ended, self.returncode = ended, None

    def poll(self) -> str | None:
        self.returncode = self.ended()
        return self.returncode


def slurm_job(two_hosts, job: int) -> Job:
    return Job(lambda: (two_hosts.slurm.finished(job) or {}).get("JobState"))


def hosts_of(folder: Path) -> list[str]:
    return json.loads((folder / "run.json").read_text())["starts"][-1]["hosts"]


def test_slurm_two_nodes_train_one_run_stopped_requeued_and_resumed_bitwise(two_hosts, reference, tmp_path, shards):
    """Each node streams the shards from the shared folder into a cache in its own /tmp, as nodes with a shared
    home and local disks do."""
    config, ref = reference
    log, hold = tmp_path / "two.out", Hold(tmp_path / "hold", 4)
    cache = Path("/tmp/slm-test-cache")  # on each host its own
    caches = [f"data.{split}.{where}={root / split}" for split in ("train", "eval")
              for where, root in (("remote", shards), ("local", cache))]
    job = two_hosts.slurm.submit("--nodes=2", "--output", str(job_log(log)), "jobs/train.sbatch", str(config),
                                 "run_name=two", *RUN, *caches, cwd=REPO, env=hold.job_env)
    hold.wait(slurm_job(two_hosts, job), processes=2)
    assert len(held_on(hold, 4, 0)) == len(held_on(hold, 4, 1)) == 1  # one process on each host
    two_hosts.slurm.run("scancel", "--signal=USR1", "--batch", str(job))  # the time limit's warning
    hold.wait_signalled(processes=2)
    hold.release()
    info = wait_until(lambda: two_hosts.slurm.finished(job), 400, f"Slurm job {job}")
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert "slm launch: node 1 of 2 (h1)" in text and "slm launch: node 2 of 2 (h2)" in text, text[-4000:]
    stopped = re.search(r"stopped at batch (\d+) on SIGUSR1, checkpoint saved", text)
    assert stopped and f"resumed at batch {stopped.group(1)} of 24ba" in text, text[-4000:]
    folder = config.parent / "ckpt" / "two"
    assert hosts_of(folder) == ["h1", "h2"]
    for host in ("h1", "h2"):
        assert two_hosts.on(host, "ls", str(cache / "train")).stdout.split().count("index.json") == 1, host
    assert not cache.exists()  # not in this machine's /tmp
    assert_bitwise_equal(final_state(ref), final_state(folder))


def test_sge_two_hosts_train_one_run_stopped_requeued_and_resumed_bitwise(two_hosts, reference, tmp_path):
    config, ref = reference
    log, hold = tmp_path / "two.out", Hold(tmp_path / "hold", 4)
    job = two_hosts.qsub("-pe", "mpi", "2", "-o", str(job_log(log)), "jobs/train.sh", str(config),
                         "run_name=sge-two", *RUN, cwd=REPO, env=hold.job_env)
    hold.wait(Job(lambda: None if two_hosts.sge_in_queue(job) else "gone from the queue"), processes=2)
    # What SGE does at the soft limit (s_rt): USR1 to the job's processes, here those on its first host (the job
    # script's process group); the ranks on the other host stop at the same batch (slm/training/preemption.py).
    os.killpg(wait_until(lambda: two_hosts.sge_job_pid(job), 30, "the job's pid"), signal.SIGUSR1)
    hold.release()
    wait_until(lambda: not two_hosts.sge_in_queue(job), JOB_TIMEOUT, f"SGE job {job}")
    copy = re.search(rf"a copy of job {job} resumes it: Your job (\d+)", log.read_text())
    assert copy, log.read_text()[-4000:]  # SGE does not restart a requeued job where qrsh -inherit ran (train.sh)
    wait_until(lambda: not two_hosts.sge_in_queue(int(copy.group(1))), JOB_TIMEOUT, f"SGE job {copy.group(1)}")
    text = log.read_text()
    assert "slm launch: node 1 of 2" in text and "slm launch: node 2 of 2" in text, text[-4000:]
    stopped = re.search(r"stopped at batch (\d+) on SIGUSR1, checkpoint saved", text)
    assert stopped and f"slm job: SGE job {copy.group(1)} (restarted: 0)" in text, text[-4000:]
    assert f"resumed at batch {stopped.group(1)} of 24ba" in text, text[-4000:]
    folder = config.parent / "ckpt" / "sge-two"
    assert sorted(hosts_of(folder)) == ["h1", "h2"]
    assert_bitwise_equal(final_state(ref), final_state(folder))


def test_a_node_killed_mid_run_stops_the_other_and_resubmitting_resumes_bitwise(two_hosts, reference, tmp_path):
    """SIGKILL of the second node's training process while both wait at batch 4: the first node's process meets a
    dead peer in its next collective and exits (within dist_timeout, a minute), the job fails, and the job
    submitted again resumes from the newest whole checkpoint and ends bitwise equal."""
    config, ref = reference
    log, hold = tmp_path / "killed.out", Hold(tmp_path / "hold", 4)
    job = two_hosts.slurm.submit("--nodes=2", "--output", str(job_log(log)), "jobs/train.sbatch", str(config),
                                 "run_name=killed", *RUN, cwd=REPO, env=hold.job_env)
    hold.wait(slurm_job(two_hosts, job), processes=2)
    os.kill(held_on(hold, 4, 1)[0], signal.SIGKILL)
    hold.release()
    info = wait_until(lambda: two_hosts.slurm.finished(job), 240, f"Slurm job {job}")
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log.read_text()[-4000:]
    again_log = tmp_path / "again.out"
    again = two_hosts.slurm.submit("--nodes=2", "--output", str(job_log(again_log)), "jobs/train.sbatch",
                                   str(config), "run_name=killed", *RUN, cwd=REPO)
    info = wait_until(lambda: two_hosts.slurm.finished(again), 400, f"Slurm job {again}")
    text = again_log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert re.search(r"killed: resumed at batch (4|[1-9]\d*) of 24ba", text), text[-4000:]
    assert_bitwise_equal(final_state(ref), final_state(config.parent / "ckpt" / "killed"))


def test_a_rendezvous_host_that_is_not_there_is_one_line(two_hosts, reference):
    """The second node's process, its first node never started: one line naming the host and port, exit 1."""
    config, _ = reference
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "NODE_RANK": "1",
           "MASTER_ADDR": "h1", "MASTER_PORT": "29999"}
    proc = two_hosts.on("h2", os.environ.get("SLM_VENV", ".venv") + "/bin/python", "slm/train.py", str(config),
                        "run_name=alone", "dist_timeout=5", cwd=REPO, env=env, timeout=300)
    shown_on_failure(["slm/train.py on h2"], proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if "slm train: error" in line]
    assert proc.returncode == 1 and errors == [
        "slm train: error (rank 1): the processes of this run did not all meet at the rendezvous h1:29999 within "
        "5 s (dist_timeout): check that every node of the job started and reaches h1:29999 (The client socket has "
        "timed out after 5000ms while trying to connect to (h1, 29999).)"], proc.stderr[-3000:]
    assert not (config.parent / "ckpt" / "alone" / "config.yaml").exists()


# ---------------------------------------------------------------- tokenizing in parts across the hosts

@pytest.fixture(scope="module")
def one_process_shards(tmp_path_factory: pytest.TempPathFactory, foreign_corpus: str, tokenizer_dir: Path
                       ) -> tuple[list[str], dict[str, bytes]]:
    """`slm tokenize`'s arguments but --out-dir, and the files it writes in one process (of a corpus no one here
    wrote, conftest.py)."""
    args = ["-i", foreign_corpus, "-f", "text", "-t", str(tokenizer_dir), "-l", "64"]
    out = tmp_path_factory.mktemp("hosts-one-process") / "mds"
    run_slm("tokenize", *args, "--out-dir", str(out))
    return args, {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def assert_parts_on_both_hosts_merged(out: Path, expected: dict[str, bytes], part_logs: list[str], merge_log: str
                                      ) -> None:
    logs = "".join(part_logs) + merge_log
    assert all(f"part {task} of 3 done" in log for task, log in enumerate(part_logs, 1)), logs[-4000:]
    hosts = {re.search(r"slm job: \w+ job \d+ on (h[12])", log).group(1) for log in part_logs}
    assert hosts == {"h1", "h2"}, logs[-4000:]
    assert out.is_dir(), merge_log[-4000:]
    got = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert sorted(got) == sorted(expected) and [n for n in got if got[n] != expected[n]] == [], logs[-4000:]


def test_slurm_tokenize_parts_on_both_hosts_then_a_merge_equal_one_process(two_hosts, one_process_shards,
                                                                           tmp_path):
    """Each part a whole node (--exclusive): parts 1 and 2 on the two hosts, part 3 after either."""
    args, expected = one_process_shards
    args = ["--parts", "3", *args, "--out-dir", str(tmp_path / "mds")]
    array = two_hosts.slurm.submit("--array=1-3", "--exclusive", "--output", str(job_log(tmp_path / "part-%a.out")),
                                   "jobs/tokenize.sbatch", *args, cwd=REPO)
    merge = two_hosts.slurm.submit(f"--dependency=afterok:{array}", "--output", str(job_log(tmp_path / "merge.out")),
                                   "jobs/tokenize.sbatch", *args, cwd=REPO, env={"SLM_TOKENIZE_MERGE": "1"})
    info = wait_until(lambda: two_hosts.slurm.finished(merge), JOB_TIMEOUT, f"the merge job {merge}")
    merge_log = (tmp_path / "merge.out").read_text()
    assert info["JobState"] == "COMPLETED", merge_log[-4000:]
    part_logs = [(tmp_path / f"part-{task}.out").read_text() for task in (1, 2, 3)]
    assert_parts_on_both_hosts_merged(tmp_path / "mds", expected, part_logs, merge_log)


def test_sge_tokenize_parts_on_both_hosts_then_a_merge_equal_one_process(two_hosts, one_process_shards, tmp_path):
    """Each part a whole host (both of its GPUs, SGE's consumable `gpu`: the PE `mpi` puts one slot on a host): parts
    1 and 2 on the two hosts, part 3 after either; each reads its run of the corpus's files streamed."""
    args, expected = one_process_shards
    args = ["--parts", "3", "--stream", *args, "--out-dir", str(tmp_path / "mds")]
    for task in (1, 2, 3):
        job_log(tmp_path / f"part.{task}.out")
    array = two_hosts.qsub("-t", "1-3", "-pe", "mpi", "1", "-l", "gpu=2", "-o", f"{tmp_path}/part.$TASK_ID.out",
                           "jobs/tokenize.sh", *args, cwd=REPO)
    merge = two_hosts.qsub("-hold_jid", str(array), "-pe", "mpi", "1", "-o", str(job_log(tmp_path / "merge.out")),
                           "jobs/tokenize.sh", *args, cwd=REPO, env={"SLM_TOKENIZE_MERGE": "1"})
    wait_until(lambda: not two_hosts.sge_in_queue(merge), JOB_TIMEOUT, f"the merge job {merge}")
    part_logs = [(tmp_path / f"part.{task}.out").read_text() for task in (1, 2, 3)]
    assert_parts_on_both_hosts_merged(tmp_path / "mds", expected, part_logs, (tmp_path / "merge.out").read_text())
