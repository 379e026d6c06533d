"""Streaming's shared memory on one node: the clean-up of what killed runs left, and runs starting at the same
moment, which must neither share a prefix nor lose a block to each other's clean-up."""

import os
import random
import signal
import subprocess
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path

import pytest

import slm.core.shared_memory
from slm.core.shared_memory import clean_stale_shared_memory

from helpers import REPO, Started, assert_bitwise_equal, final_state, run_cmd, train_cmd, write_yaml


def test_removes_only_blocks_no_living_process_maps(tmp_path):
    alive = shared_memory.SharedMemory(name="987654_locals", create=True, size=64)  # mapped by this process
    stale = Path("/dev/shm/987653_barrier")
    stale.write_bytes(b"\0" * 64)  # what a SIGKILLed run leaves: a block nobody maps
    unrelated = Path("/dev/shm/987653_not_streaming")
    unrelated.write_bytes(b"x")
    try:
        removed = clean_stale_shared_memory()
        assert "987653_barrier" in removed and not stale.exists()
        assert Path("/dev/shm/987654_locals").exists() and "987654_locals" not in removed
        assert unrelated.exists()
    finally:
        alive.close()
        alive.unlink()
        unrelated.unlink(missing_ok=True)


def test_the_top_level_script_spares_a_live_block(tmp_path):
    alive = shared_memory.SharedMemory(name="987652_locals", create=True, size=64)
    stale = Path("/dev/shm/987651_barrier")
    stale.write_bytes(b"\0" * 64)
    try:
        script = [sys.executable, str(REPO / "clean_shared_memory.py")]
        dry = subprocess.run([*script, "--dry-run"], capture_output=True, text=True, cwd=tmp_path, check=True)
        assert "987651_barrier" in dry.stdout and stale.exists()
        done = subprocess.run(script, capture_output=True, text=True, cwd=tmp_path, check=True)
        assert "removed" in done.stdout and "987651_barrier" in done.stdout and not stale.exists()
        assert "987652_locals" not in done.stdout and Path("/dev/shm/987652_locals").exists()
    finally:
        alive.close()
        alive.unlink()
        stale.unlink(missing_ok=True)


@pytest.mark.train
def test_runs_one_after_another_in_one_process_hold_no_more_descriptors(tmp_path, shards, capfd):
    """Streaming keeps a dataset's shared memory open until the process exits, and each new dataset opens the
    blocks of every earlier one: a notebook (or a test) training run after run in one process ran out of file
    descriptors. A run lets go of what it opened, finished or failed, so the count stays where the first run left
    it, even beside a dataset this process keeps open. And the notebook's Ctrl-C and signals are its own again."""
    from streaming import StreamingDataset

    from slm.core.streaming_workarounds import prefix_registered_under_node_lock
    from slm.train import main as train_main

    with prefix_registered_under_node_lock():  # as slm's readers do: a session beside this one reads too
        kept = StreamingDataset(local=str(shards / "train"), batch_size=1)  # noqa: F841 (a user's own dataset, open)
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    handlers = {sig: signal.getsignal(sig) for sig in signals}
    held = []
    for run in range(4):
        assert train_main([str(config), f"run_name=r{run}", "max_duration=2ba", "save_interval=2ba",
                           "eval_interval=2ba"]) == 0, capfd.readouterr().err[-3000:]
        held.append(len(os.listdir("/proc/self/fd")))
    assert train_main([str(config), "run_name=bad", "data.train.local=/nowhere"]) == 1  # a run that fails
    held.append(len(os.listdir("/proc/self/fd")))
    assert max(held) <= held[0], held
    assert {sig: signal.getsignal(sig) for sig in signals} == handlers


def test_a_block_made_while_the_clean_up_reads_the_maps_is_kept(monkeypatch):
    """A run registering its prefix while another run's clean-up looks (the old order read the living processes'
    maps first, then listed /dev/shm, and removed the new block, which no map named yet)."""
    made = []
    read_maps = slm.core.shared_memory._prefixes_in_use

    def meanwhile() -> set[str]:
        in_use = read_maps()
        if not made:  # just after the maps were read
            made.append(shared_memory.SharedMemory(name="987650_locals", create=True, size=64))
        return in_use

    monkeypatch.setattr(slm.core.shared_memory, "_prefixes_in_use", meanwhile)
    try:
        assert "987650_locals" not in clean_stale_shared_memory()
        assert Path("/dev/shm/987650_locals").exists()
    finally:
        for block in made:
            block.close()
            if Path("/dev/shm/987650_locals").exists():
                block.unlink()


REGISTER = """
import sys, time
from streaming import StreamingDataset
from streaming.base.shared import prefix
from slm.core import streaming_workarounds
scan = prefix._check_and_find
def slow_scan(*args, **kwargs):  # another run has time to scan meanwhile
    found = scan(*args, **kwargs)
    time.sleep(0.3)
    return found
prefix._check_and_find = slow_scan
with streaming_workarounds.prefix_registered_under_node_lock():
    dataset = StreamingDataset(local=sys.argv[1], batch_size=1)
print(dataset._shm_prefix_int, flush=True)
time.sleep(3)  # held while the other registers
"""


def test_datasets_registering_at_the_same_moment_get_prefixes_of_their_own(shards, tmp_path):
    """Streaming's own registration, slowed as on a loaded machine, gives two processes the same prefix and one
    of them fails creating it; under the node's lock each gets its own."""
    procs = [Started([sys.executable, "-c", REGISTER, str(shards / name)], stdout=subprocess.PIPE)
             for name in ("train", "eval")]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert len({out.strip() for out, _ in outputs}) == 2, outputs


@pytest.mark.train  # in the main session: the second one is the longer
def test_runs_starting_at_the_same_moment_each_end_as_if_alone(tmp_path, shards):
    """Seven training processes start within milliseconds of each other on one machine: two `composer -n 2` runs,
    two runs sharing the cores through `python -m slm.cluster.launch ... --next`, and two `python slm/train.py`. Each
    run ends bitwise equal to the same run made alone: none took another's Streaming prefix, lost a block to another's
    clean-up of stale shared memory, or met another's port."""
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    seeds = {"0": [], "7": ["seed=7"]}
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # as each --next run has
    commands = [train_cmd(config, f"run_name=two-{s}", *args, procs=2) for s, args in seeds.items()]
    commands.append([sys.executable, "-m", "slm.cluster.launch", "slm/train.py", str(config), "run_name=next-0",
    "--next",
                     str(config), "run_name=next-7", "seed=7"])
    commands += [train_cmd(config, f"run_name=one-{s}", *args) for s, args in seeds.items()]
    random.shuffle(commands)
    procs = []
    for command in commands:
        procs.append(Started(command, env=one_thread))
        time.sleep(random.uniform(0, 0.05))
    assert [proc.wait(timeout=900) for proc in procs] == [0] * len(procs)
    ckpt = tmp_path / "ckpt"
    for s, args in seeds.items():  # alone, one after another
        for procs_, name in ((1, "alone-one"), (2, "alone-two")):
            alone = run_cmd(train_cmd(config, f"run_name={name}-{s}", *args, procs=procs_), env=one_thread)
            assert alone.returncode == 0, alone.stderr[-3000:]
        for name in ("one", "next"):
            assert_bitwise_equal(final_state(ckpt / f"alone-one-{s}"), final_state(ckpt / f"{name}-{s}"))
        assert_bitwise_equal(final_state(ckpt / f"alone-two-{s}"), final_state(ckpt / f"two-{s}"))
