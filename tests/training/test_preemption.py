"""A signal to one rank: every rank stops at the same batch end with a checkpoint, exits 75, and the next
start resumes bitwise. (One process, and the signals as the schedulers send them: tests/cluster/test_jobs.py.)
Ctrl-C, as a terminal sends it (SIGINT to the whole process group), in the three ways a user starts training:
the first stops at the batch end with a checkpoint and exit 130, a second at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from clusters import wait_until

from slm.core.run_folder import checkpoints, newest_complete, read_metrics
from slm.training.preemption import StopOnSignal

from helpers import (
    Hold,
    Started,
    assert_bitwise_equal,
    final_state,
    ranks_of,
    resumed_at,
    run_cmd,
    train,
    train_cmd,
    write_yaml,
)

EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130

pytestmark = [pytest.mark.train, pytest.mark.beside]  # training subprocesses and their signals


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory, shards) -> tuple[Path, Path]:
    """The tiny yaml and its uninterrupted `composer -n 2` run (its final state's folder), which the interrupted
    two-process runs of this module must end bitwise equal to."""
    root = tmp_path_factory.mktemp("two-process-reference")
    config = write_yaml(root / "tiny.yaml", shards)
    train(config, "run_name=ref", procs=2)
    return config, root / "ckpt" / "ref"


def stopped_by_a_signal_to_rank_1(cmd: list[str], hold: Hold) -> tuple[subprocess.Popen, str, int]:
    """Start a two-process run, hold both ranks at the end of `hold`'s batch (its checkpoint written), SIGTERM rank 1
    alone, release them: (the launcher's process, its stderr, the batch the run says it stopped at)."""
    proc = Started(cmd, env=hold.env)
    try:
        hold.wait(proc, processes=2)
        os.kill(ranks_of(proc)[1], signal.SIGTERM)
        hold.release()
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    stopped = re.search(r"stopped at batch (\d+) on a signal to another process, checkpoint saved", stderr)
    assert stopped, stderr[-3000:]  # rank 0 reports it: it was not signalled itself
    return proc, stderr, int(stopped.group(1))


def test_signal_to_one_rank_stops_all_at_one_checkpoint_and_resumes_bitwise(two_process_reference, tmp_path):
    config, ref = two_process_reference
    folder = config.parent / "ckpt" / "pre"
    cmd = train_cmd(config, "run_name=pre", procs=2)

    proc, stderr, batch = stopped_by_a_signal_to_rank_1(cmd, Hold(tmp_path / "hold", 4))
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert 4 <= batch < 16
    assert final_state(folder)["timestamp"]["Timestamp"]["batch"] == batch  # the checkpoint at the stop
    rows = read_metrics(folder)
    assert [r["batch"] for r in rows] == list(range(1, batch + 1))
    assert [r["batch"] for r in rows if "metrics/eval/CrossEntropy" in r] == [8] * (batch >= 8)  # no early final eval
    assert run_state(folder) == ("stopped", f"at batch {batch} on a signal to another process")

    last = run_cmd(cmd)
    assert last.returncode == 0, last.stderr[-3000:]
    assert resumed_at(last) == batch
    assert run_state(folder) == ("finished", "at batch 16")
    assert_bitwise_equal(final_state(ref), final_state(folder))
    rows = read_metrics(folder)
    assert [r["batch"] for r in rows] == list(range(1, 17))
    assert [r["batch"] for r in rows if "metrics/eval/CrossEntropy" in r] == [8, 16]


def test_torchrun_trains_stops_and_resumes_bitwise_as_composer_does(two_process_reference, tmp_path):
    """`torchrun --standalone --nproc-per-node 2 slm/train.py ...` (nanollama's launcher): a SIGTERM to one rank
    stops both at one batch end with a checkpoint; the same command resumes, and the run ends bitwise equal to
    `composer -n 2`'s uninterrupted one. (torchrun reports its workers' 75 as a failure: it exits 1.)"""
    config, ref = two_process_reference
    folder = config.parent / "ckpt" / "tr"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
           str(Path(train_cmd(config)[1])), str(config), "run_name=tr"]
    proc, stderr, batch = stopped_by_a_signal_to_rank_1(cmd, Hold(tmp_path / "hold", 4))
    assert proc.returncode != 0, stderr[-3000:]
    assert final_state(folder)["timestamp"]["Timestamp"]["batch"] == batch
    last = run_cmd(cmd)
    assert last.returncode == 0, last.stderr[-3000:]
    assert resumed_at(last) == batch
    assert_bitwise_equal(final_state(ref), final_state(folder))


class Terminal:
    """A command started as a terminal's foreground job (its own process group), its stderr read as it comes."""

    def __init__(self, cmd: list[str], hold: Hold, **env: str):
        self.proc = Started(cmd, start_new_session=True, env={**hold.env, **env})

    @property
    def stderr(self) -> str:
        return self.proc.stderr_text

    def wait_for_line(self, text: str) -> None:
        wait_until(lambda: text in self.stderr or self.proc.poll() is not None, 120, repr(text), 0.005)

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self) -> int:
        try:
            self.proc.wait(timeout=300)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


def stopped_by_ctrl_c(run: Terminal, folder: Path) -> int:
    """The batch a Ctrl-C stopped the run at: announced at once, the checkpoint of that batch saved, exit 130."""
    assert run.finish() == EXIT_INTERRUPTED, run.stderr[-3000:]
    announced = re.search(r"slm train: Ctrl-C: stopping at the end of batch (\d+) with a checkpoint.*; Ctrl-C again "
                          r"to stop at once", run.stderr)
    stopped = re.search(r"slm train: \S+: stopped at batch (\d+) on SIGINT, checkpoint saved; the same command "
                        r"resumes it", run.stderr)
    assert announced and stopped, run.stderr[-3000:]
    batch = int(stopped.group(1))
    assert int(announced.group(1)) == batch
    assert final_state(folder)["timestamp"]["Timestamp"]["batch"] == batch
    return batch


def test_ctrl_c_once_checkpoints_twice_stops_at_once_and_the_run_ends_bitwise(tmp_path, shards):
    """The run held at a batch end until the test has pressed Ctrl-C (tests/hooks). Twice, under
    `python -m slm.cluster.launch`: training and launcher stop at once, 130, no checkpoint of the batch under way. Once,
    to
    `python slm/train.py`: the rerun resumes from the newest checkpoint, stops at the batch end with a checkpoint,
    130. The next rerun ends bitwise equal to an uninterrupted run."""
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    overrides = ["global_batch_size=16", "max_duration=4ba", "eval_interval=4ba", "save_interval=1ba"]
    train(config, "run_name=ref", *overrides)
    folder = tmp_path / "ckpt" / "pre"
    cmd = train_cmd(config, "run_name=pre", *overrides)

    hold = Hold(tmp_path / "hold-twice", 1)
    twice = Terminal([sys.executable, "-m", "slm.cluster.launch", *cmd[1:]], hold, CUDA_VISIBLE_DEVICES="")
    hold.wait(twice.proc)  # held at the end of batch 1: both Ctrl-Cs come before batch 2 ends
    twice.ctrl_c()
    twice.wait_for_line("Ctrl-C again to stop at once")
    twice.ctrl_c()
    hold.release()
    assert twice.finish() == EXIT_INTERRUPTED, twice.stderr[-3000:]
    announced = re.search(r"stopping at the end of batch (\d+)", twice.stderr)
    assert announced and "slm train: interrupted" in twice.stderr and "stopped at batch" not in twice.stderr, \
        twice.stderr[-3000:]
    assert "Composer's launcher allows" not in twice.stderr  # slm.cluster.launch waits for the batch end, however long
    # a checkpoint being written when the second Ctrl-C came is finished first: the newest is whole
    assert sorted(checkpoints(folder)) == list(range(1, int(announced.group(1))))
    assert newest_complete(folder) == checkpoints(folder)[int(announced.group(1)) - 1]
    assert run_state(folder) == ("stopped", "a second Ctrl-C stopped it at once")

    hold = Hold(tmp_path / "hold-once", int(announced.group(1)))
    once = Terminal(cmd, hold)  # Ctrl-C once the batch that was under way is saved this time
    hold.wait(once.proc)
    once.ctrl_c()
    hold.release()
    batch = stopped_by_ctrl_c(once, folder)
    assert run_state(folder) == ("stopped", f"at batch {batch} on SIGINT")
    assert resumed_at(once) == int(announced.group(1)) - 1
    assert [r["batch"] for r in read_metrics(folder)] == list(range(1, batch + 1))

    last = run_cmd(cmd)
    assert last.returncode == 0, last.stderr[-3000:]
    assert resumed_at(last) == batch
    assert run_state(folder) == ("finished", "at batch 4")
    assert_bitwise_equal(final_state(tmp_path / "ckpt" / "ref"), final_state(folder))


def test_ctrl_c_to_composer_and_its_ranks_checkpoints(tmp_path, shards):
    """`composer -n 2`, two data-loader workers each (they inherit the handlers and leave Ctrl-C to their rank): the
    ranks get the Ctrl-C, and Composer's launcher, which also gets it, sends them SIGTERM (and SIGKILL 30 s later):
    they stop at one batch end with a checkpoint, and the launcher exits 130."""
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    folder = tmp_path / "ckpt" / "two"
    hold = Hold(tmp_path / "hold", 4)
    run = Terminal(train_cmd(config, "run_name=two", "data.num_workers=2", procs=2), hold)
    hold.wait(run.proc, processes=2)
    run.ctrl_c()
    hold.release()
    assert 4 <= stopped_by_ctrl_c(run, folder) < 16
    assert "with a checkpoint (if within the 30 s Composer's launcher allows" in run.stderr


def test_as_the_script_a_ctrl_c_after_the_run_cannot_kill_it_on_its_way_out(tmp_path, shards):
    """Once the script's status is settled, Ctrl-C is ignored: Python resets the signals it handles to the default
    (death) while the interpreter shuts down, and a second Ctrl-C then ended the process by the signal (-2)."""
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    code = ("import signal, sys; from slm.train import command; status = command(); "
            "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN); sys.exit(status)")
    cmd = train_cmd(config, "run_name=out", "max_duration=2ba")
    proc = run_cmd([sys.executable, "-c", code, *cmd[2:]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "True"


def test_slm_train_is_the_script_stopped_by_a_signal_and_resumed_bitwise_with_delphis_flags(tmp_path, shards):
    """`slm train` runs what `python slm/train.py` runs: a SIGTERM at a batch end stops it with a checkpoint and exit
    75; `--overrides k=v` means bare k=v, `hub.repo=""` publishing off, `-s` no progress lines; the resumed run ends
    bitwise equal to the script's uninterrupted run."""
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    train(config, "run_name=ref")
    folder = tmp_path / "ckpt" / "cli"
    cmd = [str(Path(sys.executable).parent / "slm"), "train", str(config), "run_name=cli", "--overrides",
           "hub.repo=", "logging.wandb.project=''"]
    hold = Hold(tmp_path / "hold", 4)
    proc = Started([*cmd, "-v"], env=hold.env)  # Composer telling what it does
    try:
        hold.wait(proc)
        proc.send_signal(signal.SIGTERM)
        hold.release()
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "slm train: cli: starting at batch 0 of 16ba" in stderr and "stopped at batch" in stderr, stderr[-3000:]
    assert ": INFO: composer." in stderr, stderr[-3000:]
    saved = (folder / "config.yaml").read_text()
    assert "repo: null" in saved and "project: null" in saved
    silent = run_cmd([*cmd, "-s"])  # resumed and trained to the end, saying nothing
    assert silent.returncode == 0 and silent.stderr == "", silent.stderr[-3000:]
    assert_bitwise_equal(final_state(tmp_path / "ckpt" / "ref"), final_state(folder))


@pytest.mark.parametrize("after", [signal.SIGTERM, signal.SIGUSR1])
def test_a_ctrl_c_is_what_stopped_the_run_whatever_came_before_or_after_it(after):
    """Composer's launcher answers a Ctrl-C with SIGTERM, which can reach a rank before its own SIGINT is handled (or
    inside that handler): the run still stops as a Ctrl-C's (130) and says SIGINT, in either order."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        for first, second in ((after, signal.SIGINT), (signal.SIGINT, after)):
            stop = StopOnSignal()
            state = SimpleNamespace(timestamp=SimpleNamespace(batch=3), max_duration="16ba", stop_training=lambda: None)
            stop.fit_start(state, None)
            os.kill(os.getpid(), first)
            os.kill(os.getpid(), second)
            stop.batch_checkpoint(state, None)
            assert (stop.stopped_at, stop.received, stop.exit_status) == (3, "SIGINT", EXIT_INTERRUPTED)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def run_state(folder: Path) -> tuple[str, str]:
    """What `slm status` says of the run: its state and the detail, without the time."""
    from slm.analysis.status import run_status

    status = run_status(folder)
    return status.state, status.detail.rsplit(" (", 1)[0]
