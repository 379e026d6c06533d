import os
import signal
from multiprocessing import shared_memory
from pathlib import Path

import pytest

from slm.shm import clean_stale_shared_memory

from helpers import write_yaml


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
    import subprocess
    import sys

    from helpers import REPO

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

    from slm.train import main as train_main

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
