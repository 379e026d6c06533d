"""The job scripts on real one-node Slurm and SGE clusters (tests/clusters.py): a training job, resubmission,
preemption and requeue ending bitwise equal to an uninterrupted run, a 2 x 2 grid run as a 4-task suite array, and a
corpus no one here wrote tokenized as a 3-task array (loaded on Slurm, streamed on SGE) and a merge, equal to one
process's shards."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from clusters import JOB_TIMEOUT, wait_until
from omegaconf import OmegaConf

from helpers import REPO, Hold, assert_bitwise_equal, final_state, job_log, run_slm, train, write_yaml

SLOW = ["max_duration=64ba", "global_batch_size=32"]  # signalled while held at a batch end (Hold)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    """Uninterrupted runs of the jobs' configs, started directly: ckpt/ref and ckpt/ref-slow."""
    root = tmp_path_factory.mktemp("jobs-reference")
    config = write_yaml(root / "tiny.yaml", shards)
    train(config, "run_name=ref")
    train(config, "run_name=ref-slow", *SLOW)
    return root / "ckpt"


@pytest.fixture(scope="module")
def one_process_shards(tmp_path_factory: pytest.TempPathFactory, foreign_corpus: str, tokenizer_dir: Path
                       ) -> dict[str, bytes]:
    """The files `slm tokenize` writes in one process from a corpus no one here wrote (conftest.py), which the
    tokenize jobs' merges must equal byte for byte."""
    out = tmp_path_factory.mktemp("one-process") / "mds"
    run_slm(*tokenize_args(foreign_corpus, tokenizer_dir, out))
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def tokenize_args(corpus: str, tokenizer_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["tokenize", "-i", corpus, "-f", "text", "-t", str(tokenizer_dir), "-l", "64", "--out-dir", str(out),
            *extra]


def assert_merged(out: Path, expected: dict[str, bytes], logs: str) -> None:
    assert out.is_dir(), logs[-4000:]
    got = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert sorted(got) == sorted(expected) and [n for n in got if got[n] != expected[n]] == [], logs[-4000:]
    assert not out.with_name("mds.parts").exists()


def read_and_remove(log: Path) -> str:
    text = log.read_text() if log.exists() else f"(no log at {log})"
    log.unlink(missing_ok=True)
    return text


# The suites' 2 x 2 grid, seed=42,7 x optimizer.lr=3e-3,1e-3, in task order (the first axis slowest). Seed 42 and
# lr 3e-3 are the reference run's own values (the schema's seed, demo-llama's lr): that task trains it again.
GRID_RUNS = {"seed42_lr3e-3": (42, 3e-3), "seed42_lr1e-3": (42, 1e-3), "seed7_lr3e-3": (7, 3e-3),
             "seed7_lr1e-3": (7, 1e-3)}


def assert_grid_trained(ckpt: Path, stem: str, logs: list[str], reference: Path) -> None:
    """Four run folders named after their combinations, each trained to the end with its combination (its log,
    its config.yaml), and the reference's combination bitwise equal to the reference trained directly."""
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(f"{stem}_{run}" for run in GRID_RUNS)
    for (run, (seed, lr)), log in zip(GRID_RUNS.items(), logs, strict=True):
        folder = ckpt / f"{stem}_{run}"
        assert f"slm train: {folder.name}: starting at batch 0 of 16ba" in log, log[-3000:]
        saved = OmegaConf.load(folder / "config.yaml")
        assert (saved.run_name, saved.seed, saved.optimizer.lr) == (folder.name, seed, lr)
        assert final_state(folder)["timestamp"]["Timestamp"]["batch"] == 16
    assert_bitwise_equal(final_state(reference / "ref"), final_state(ckpt / f"{stem}_seed42_lr3e-3"))


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A submission folder laid out as a fresh clone after `make venv` (the repository's venvs, jobs, yamls and
    code), with a logs/ folder and no data yet."""
    root = tmp_path / "checkout"
    (root / "logs").mkdir(parents=True)
    for name in (".venv", ".venv-current", "jobs", "yamls", "slm"):
        if (REPO / name).exists():
            (root / name).symlink_to(REPO / name)
    return root


@pytest.fixture(scope="module")
def example_data(tmp_path_factory: pytest.TempPathFactory, corpus: Path, tokenizer_dir: Path) -> Path:
    """Shards standing in for `make data`'s: a train split of one batch of the example's 256 samples (345 samples),
    so its 10 epochs are 10 batches."""
    root = tmp_path_factory.mktemp("example-data")
    for name, split in (("train", "train[:20%]"), ("validation", "train[90%:]")):
        run_slm("tokenize", "-i", str(corpus), "-f", "story", "-s", split, "-t", str(tokenizer_dir), "-l", "64",
                "--out-dir", str(root / name))
    return root


def make_data(checkout: Path, example_data: Path) -> None:
    """What `make data` leaves for the example: data/mds/train and data/mds/validation."""
    shutil.copytree(example_data, checkout / "data" / "mds")


EXAMPLE = "slm job: no config given: training the example, yamls/mamba-100k.yaml"


def assert_example_trained(log: str, folder: Path) -> None:
    assert EXAMPLE in log and "slm train: mamba-100k: starting at batch 0 of 10ep" in log, log[-3000:]
    state = final_state(folder)
    assert (state["timestamp"]["Timestamp"]["epoch"], state["timestamp"]["Timestamp"]["batch"]) == (10, 10), \
        log[-3000:]  # the example's max_duration, one batch an epoch
    assert OmegaConf.load(folder / "config.yaml").model["class"] == "mamba"


@pytest.mark.parametrize("script", ["jobs/train.sbatch", "jobs/train.sh"])
def test_a_job_with_no_argument_says_to_make_the_examples_data_in_one_line(script, checkout):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SGE_"))} | {"JOB_ID": "1"}
    proc = subprocess.run(["bash", script], cwd=checkout, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == (
        "slm job: no config given, so the example yamls/mamba-100k.yaml, which reads data/mds/train: not found in "
        f"{checkout}; run 'make data' there (on a login node), then submit again\n"), proc.stderr
    assert not (checkout / "checkpoints").exists()


@pytest.mark.parametrize("script, args, message", [
    ("jobs/train.sh", ["yamls/no-such.yaml"], "config yamls/no-such.yaml not found in"),
    ("jobs/train.sh", ["max_duration=5ba"], "usage: qsub jobs/train.sh [CONFIG.yaml [key=value ...]]"),
    ("jobs/suite.sbatch", ["max_duration=5ba"], "usage: bash jobs/suite.sbatch [--dry-run] [--per-device K] "
                                                "[--grid KEY=V1,V2,...]... CONFIG.yaml... [key=value ...]"),
    ("jobs/suite.sh", [], "usage: bash jobs/suite.sh [--dry-run] [--per-device K] [--grid KEY=V1,V2,...]... "
                          "CONFIG.yaml..."),
    ("jobs/suite.sbatch", ["--grid", "seed", "yamls/demo-llama.yaml"], "slm sweep: error: --grid 'seed' is not KEY="),
    ("jobs/tokenize.sbatch", ["-i", "corpus.jsonl", "--out-dir", "mds"], "usage: bash jobs/tokenize.sbatch --parts N "
                                                                         "[slm tokenize arguments"),
    ("jobs/tokenize.sh", ["--parts", "3", "--out-dir", "mds", "--part", "1"], "the job gives --part and --merge "
                                                                               "itself"),
    ("jobs/tokenize.sbatch", ["--parts", "3", "-i", "corpus.jsonl", "-t", "./no-tokenizer", "--out-dir", "mds"],
     "slm tokenize: error: tokenizer not found: ./no-tokenizer"),  # checked before anything is submitted
])
def test_job_scripts_refuse_bad_arguments_in_one_line(script, args, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SGE_"))} | {"JOB_ID": "1"}
    proc = subprocess.run(["bash", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------- Slurm

def test_slurm_train_job_then_resubmitting_resumes(slurm, reference, tmp_path, shards):
    config = write_yaml(tmp_path / "slurm-train.yaml", shards)
    job = slurm.submit("jobs/train.sbatch", str(config), cwd=REPO)  # the scripts' own directives, unchanged
    default_log = job_log(REPO / "logs" / f"slm-train-{job}.out")
    info = wait_until(lambda: slurm.finished(job), JOB_TIMEOUT, f"Slurm job {job}")
    log = read_and_remove(default_log)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert f"slm job: Slurm job {job} (start 1) on" in log
    assert "slm train: slurm-train: starting at batch 0 of 16ba" in log  # run_name from the yaml's stem
    assert_bitwise_equal(final_state(reference / "ref"), final_state(tmp_path / "ckpt" / "slurm-train"))

    again = slurm.submit("--output", str(job_log(tmp_path / "again.out")), "jobs/train.sbatch", str(config), cwd=REPO)
    assert wait_until(lambda: slurm.finished(again), JOB_TIMEOUT, "the resubmitted job")["JobState"] == "COMPLETED"
    assert "slm train: slurm-train: resumed at batch 16 of 16ba" in (tmp_path / "again.out").read_text()


def test_slurm_job_with_no_argument_trains_the_example(slurm, checkout, example_data):
    make_data(checkout, example_data)
    job = slurm.submit("jobs/train.sbatch", cwd=checkout)
    log = job_log(checkout / "logs" / f"slm-train-{job}.out")
    info = wait_until(lambda: slurm.finished(job), JOB_TIMEOUT, f"Slurm job {job}")
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert_example_trained(log.read_text(), checkout / "checkpoints" / "mamba-100k")


def test_slurm_time_limit_signal_then_preemption_resume_bitwise(slurm, reference, tmp_path, shards):
    config = write_yaml(tmp_path / "slurm-pre.yaml", shards)
    folder, log = tmp_path / "ckpt" / "slurm-pre", tmp_path / "pre.out"
    hold = Hold(tmp_path / "hold", 4, 12)  # the run waits at these batch ends until the test has acted
    job = slurm.submit("--output", str(job_log(log)), "jobs/train.sbatch", str(config), *SLOW, cwd=REPO,
                       env=hold.job_env)
    hold.wait()
    # What --signal=B:USR1@300 does five minutes before the time limit: the job checkpoints, requeues itself.
    slurm.run("scancel", "--signal=USR1", "--batch", str(job))
    hold.wait_signalled(4)
    hold.release(4)
    # Then, after the requeued start, the scheduler preempts it (SIGTERM to every process, then requeue).
    hold.wait(batch=12)
    slurm.run("scontrol", "requeue", str(job))
    hold.wait_signalled(12)
    hold.release(12)
    info = wait_until(lambda: slurm.finished(job), JOB_TIMEOUT, f"Slurm job {job}")
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", text[-4000:]
    first = re.search(r"stopped at batch (\d+) on SIGUSR1, checkpoint saved", text)
    assert first and "requeueing job" in text, text[-4000:]
    resumes = [int(b) for b in re.findall(r"resumed at batch (\d+)", text)]
    assert resumes[0] == int(first.group(1)) and len(resumes) == 2 and resumes[1] > 12, text[-4000:]
    assert_bitwise_equal(final_state(reference / "ref-slow"), final_state(folder))


def test_slurm_suite_runs_a_2x2_grid_two_runs_per_device_as_a_2_task_array(slurm, reference, tmp_path, shards):
    """--per-device 2: each array task trains two of the grid's runs side by side, each on one core of the job's."""
    config = write_yaml(tmp_path / "grid.yaml", shards)
    grid = ["--grid", "seed=42,7", "optimizer.lr=3e-3,1e-3"]  # two axes after one --grid, as the issue spells it
    submitted = subprocess.run(["bash", "jobs/suite.sbatch", "--per-device", "2", str(config), *grid], cwd=REPO,
                               env=slurm.env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    array = int(re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1))
    logs = []
    for task in range(2):
        info = wait_until(lambda: slurm.finished(f"{array}_{task}"), JOB_TIMEOUT, f"array task {task}")  # noqa: B023
        logs += [read_and_remove(REPO / "logs" / f"slm-suite-{array}_{task}.out")] * 2  # its two runs' log
        assert info["JobState"] == "COMPLETED", logs[-1][-3000:]
        assert "slm launch: 2 runs share this node" in logs[-1], logs[-1][-3000:]
    assert_grid_trained(tmp_path / "ckpt", "grid", logs, reference)


def test_slurm_tokenize_in_three_parts_then_a_merge_equals_one_process(slurm, one_process_shards, foreign_corpus,
                                                                       tokenizer_dir, tmp_path):
    out = tmp_path / "mds"
    args = tokenize_args(foreign_corpus, tokenizer_dir, out, "--parts", "3")[1:]  # loaded: ranges of documents
    submitted = subprocess.run(["bash", "jobs/tokenize.sbatch", *args], cwd=REPO, env=slurm.env,
                               capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    array = int(re.search(r"Submitted batch job (\d+) \(the parts, array 1-3\)", submitted.stdout).group(1))
    merge = int(re.findall(r"Submitted batch job (\d+)", submitted.stdout)[-1])
    info = wait_until(lambda: slurm.finished(merge), JOB_TIMEOUT, "the merge job")
    logs = "".join(read_and_remove(REPO / "logs" / f"slm-tokenize-{array}_{task}.out") for task in (1, 2, 3))
    logs += read_and_remove(REPO / "logs" / f"slm-tokenize-merge-{merge}.out")
    assert info["JobState"] == "COMPLETED", logs[-4000:]
    assert all(f"part {task} of 3 done" in logs for task in (1, 2, 3)), logs[-4000:]
    assert_merged(out, one_process_shards, logs)


# ---------------------------------------------------------------- SGE

def test_sge_train_job_then_resubmitting_resumes(sge, reference, tmp_path, shards):
    config = write_yaml(tmp_path / "sge-train.yaml", shards)
    job = sge.submit("jobs/train.sh", str(config), cwd=REPO)  # the scripts' own directives, unchanged
    default_log = job_log(REPO / "logs" / f"slm-train.o{job}")
    wait_until(lambda: not sge.in_queue(job), JOB_TIMEOUT, f"SGE job {job}")
    log = read_and_remove(default_log)
    assert f"slm job: SGE job {job} (restarted: 0) on" in log, log[-3000:]
    assert "slm train: sge-train: starting at batch 0 of 16ba" in log, log[-3000:]
    assert_bitwise_equal(final_state(reference / "ref"), final_state(tmp_path / "ckpt" / "sge-train"))

    again = sge.submit("-o", str(job_log(tmp_path / "again.out")), "jobs/train.sh", str(config), cwd=REPO)
    wait_until(lambda: not sge.in_queue(again), JOB_TIMEOUT, "the resubmitted job")
    assert "slm train: sge-train: resumed at batch 16 of 16ba" in (tmp_path / "again.out").read_text()


def test_sge_job_with_no_argument_trains_the_example(sge, checkout, example_data):
    make_data(checkout, example_data)
    job = sge.submit("jobs/train.sh", cwd=checkout)
    log = job_log(checkout / "logs" / f"slm-train.o{job}")
    wait_until(lambda: not sge.in_queue(job), JOB_TIMEOUT, f"SGE job {job}")
    assert_example_trained(log.read_text(), checkout / "checkpoints" / "mamba-100k")


def test_sge_soft_time_limit_signal_requeues_and_resumes_bitwise(sge, reference, tmp_path, shards):
    config = write_yaml(tmp_path / "sge-pre.yaml", shards)
    folder, log = tmp_path / "ckpt" / "sge-pre", tmp_path / "pre.out"
    hold = Hold(tmp_path / "hold", 4)
    job = sge.submit("-o", str(job_log(log)), "jobs/train.sh", str(config), *SLOW, cwd=REPO, env=hold.job_env)
    hold.wait()
    # What SGE does at the soft limit (s_rt): USR1 to every process of the job.
    os.killpg(wait_until(lambda: sge.job_pid(job), 30, "the job's pid"), signal.SIGUSR1)
    hold.release()
    wait_until(lambda: not sge.in_queue(job), JOB_TIMEOUT, f"SGE job {job}")
    text = log.read_text()
    stopped = re.search(r"stopped at batch (\d+) on SIGUSR1, checkpoint saved", text)
    assert stopped and "exit 99 asks SGE to requeue" in text, text[-4000:]
    assert f"SGE job {job} (restarted: 1)" in text, text[-4000:]
    assert f"resumed at batch {stopped.group(1)} of 64ba" in text, text[-4000:]
    assert_bitwise_equal(final_state(reference / "ref-slow"), final_state(folder))


def sge_exit_statuses(sge, job: int) -> dict[int, int]:
    """Each finished task's exit status, from SGE's accounting."""
    out = subprocess.run(["qacct", "-j", str(job)], env=sge.env, capture_output=True, text=True).stdout
    tasks = re.findall(r"(?m)^taskid\s+(\d+)\s*$", out)
    return dict(zip(map(int, tasks), map(int, re.findall(r"(?m)^exit_status\s+(\d+)", out)), strict=True))


def test_sge_suite_runs_a_2x2_grid_as_a_4_task_array(sge, reference, tmp_path, shards):
    config = write_yaml(tmp_path / "sge-grid.yaml", shards)
    with config.open("a") as f:
        f.write("sweep: {seed: [42, 7]}\n")  # one axis in the yaml, the other on the command line
    args = ["--grid", "optimizer.lr=3e-3,1e-3", str(config)]
    dry = subprocess.run(["bash", "jobs/suite.sh", "--dry-run", *args], cwd=REPO, env=sge.env, capture_output=True,
                         text=True, timeout=120)
    assert dry.returncode == 0 and dry.stdout.splitlines()[0] == "4 tasks (Slurm: sbatch --array=0-3; SGE: qsub -t 1-4)"
    assert [line.split()[1] for line in dry.stdout.splitlines()[2:]] == [f"sge-grid_{run}" for run in GRID_RUNS]
    assert not sge.qstat().strip(), "--dry-run submitted a job"
    submitted = subprocess.run(["bash", "jobs/suite.sh", *args], cwd=REPO, env=sge.env, capture_output=True,
                               text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    job = int(re.search(r"job-array (\d+)\.1-4:1 ", submitted.stdout).group(1))
    wait_until(lambda: not sge.in_queue(job), 600, f"SGE array job {job}")
    logs = [read_and_remove(REPO / "logs" / f"slm-suite.o{job}.{task}") for task in range(1, 5)]
    statuses = wait_until(lambda: len(sge_exit_statuses(sge, job)) == 4 and sge_exit_statuses(sge, job), 60, "qacct")
    assert statuses == {1: 0, 2: 0, 3: 0, 4: 0}, "\n".join(log[-2000:] for log in logs)
    assert_grid_trained(tmp_path / "ckpt", "sge-grid", logs, reference)


def test_sge_tokenize_in_three_parts_then_a_merge_equals_one_process(sge, one_process_shards, foreign_corpus,
                                                                     tokenizer_dir, tmp_path):
    out = tmp_path / "mds"
    args = tokenize_args(foreign_corpus, tokenizer_dir, out, "--stream", "--parts", "3")[1:]  # runs of its files
    submitted = subprocess.run(["bash", "jobs/tokenize.sh", *args], cwd=REPO, env=sge.env, capture_output=True,
                               text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    array = int(re.search(r"Your job-array (\d+) \(the parts, tasks 1-3\)", submitted.stdout).group(1))
    merge = int(re.search(r"Your job (\d+) \(\"slm-tokenize-merge\"\)", submitted.stdout).group(1))
    wait_until(lambda: not sge.in_queue(merge) and not sge.in_queue(array), JOB_TIMEOUT, "the merge job")
    logs = "".join(read_and_remove(REPO / "logs" / f"slm-tokenize.o{array}.{task}") for task in (1, 2, 3))
    logs += read_and_remove(REPO / "logs" / f"slm-tokenize-merge.o{merge}")
    assert all(f"part {task} of 3 done" in logs for task in (1, 2, 3)), logs[-4000:]
    assert_merged(out, one_process_shards, logs)
