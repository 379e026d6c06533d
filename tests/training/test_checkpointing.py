"""Which checkpoint files count as whole. A torn one, as a kill (a truncated file) or an exception inside torch.save
(a second Ctrl-C, a full disk: the writer still closes the zip, storages missing) leaves it, is never resumed
from, never pointed to by `latest`, never uploaded, and never the reason a whole one is pruned."""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slm.core.run_folder import LATEST, checkpoints, is_complete, newest_complete
from slm.core.trust import unpickle_checkpoint
from slm.hub.client import Hub
from slm.training.checkpointing import KeepNewestPeriodic
from slm.training.hub_checkpoints import HubPublisher

from helpers import assert_bitwise_equal, final_state, resumed_at, train, write_yaml

pytestmark = pytest.mark.train


@contextmanager
def saves_interrupted(at_save: int, before_storage: int = 1) -> Iterator[None]:
    """torch.save's `at_save`-th call (1-based) in this block raises KeyboardInterrupt before it writes storage
    `before_storage`, where a signal handler's exception lands: between two records; the writer then closes the
    zip, as it does on any exception."""
    plain = torch._C.PyTorchFileWriter
    saves = []

    class Interrupted(plain):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            saves.append(self)
            self.storages = 0

        def write_record(self, name, data, size):
            if name.startswith("data/"):
                if len(saves) == at_save and self.storages == before_storage:
                    raise KeyboardInterrupt
                self.storages += 1
            return super().write_record(name, data, size)

    torch._C.PyTorchFileWriter = Interrupted
    try:
        yield
    finally:
        torch._C.PyTorchFileWriter = plain


def storages(path: Path) -> int:
    with zipfile.ZipFile(path) as z:
        return sum("/data/" in name and not name.endswith("/") for name in z.namelist())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> tuple[Path, Path]:
    """One uninterrupted 16-batch run (checkpoints 1, 2, 4, 8, 12, 16): its config and folder."""
    root = tmp_path_factory.mktemp("whole")
    config = write_yaml(root / "tiny.yaml", shards)
    train(config, "run_name=ref")
    return config, root / "ckpt" / "ref"


def torn_copies(checkpoint: Path, out: Path) -> dict[str, Path]:
    """The checkpoint torn in each way a kill or an exception leaves it."""
    out.mkdir()
    state = unpickle_checkpoint(checkpoint)
    n, size = storages(checkpoint), checkpoint.stat().st_size
    torn = {}
    for k in (0, 1, n // 2, n - 1):
        path = torn[f"exception before storage {k} of {n}"] = out / f"interrupted-{k}.pt"
        with saves_interrupted(at_save=1, before_storage=k), pytest.raises(KeyboardInterrupt):
            torch.save(state, path)
    for cut in (100, size // 2, size - 1000, size - 1):
        path = torn[f"killed after {cut} of {size} bytes"] = out / f"killed-{cut}.pt"
        path.write_bytes(checkpoint.read_bytes()[:cut])
    return torn


def test_a_checkpoint_torn_by_a_kill_or_an_exception_is_not_complete(reference, tmp_path):
    whole = reference[1] / "ep0-ba8-rank0.pt"
    assert is_complete(whole) and storages(whole) > 4
    for how, path in torn_copies(whole, tmp_path / "torn").items():
        assert not is_complete(path), how
        if how.startswith("exception"):  # what the zip-only rule took for whole: the zip itself is sound
            assert zipfile.ZipFile(path).testzip() is None, how


def test_a_run_torn_inside_a_save_resumes_from_the_newest_whole_one_and_ends_bitwise(reference, tmp_path, shards):
    """The real saver, interrupted inside its fifth save (batch 12); `latest` even pointed at the torn file."""
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    folder = tmp_path / "ckpt" / "torn"
    from slm.train import main

    with saves_interrupted(at_save=5):  # in this process, where the patch is
        assert main([str(config), "run_name=torn"]) == 130
    assert sorted(checkpoints(folder)) == [1, 2, 4, 8, 12] and not is_complete(folder / "ep0-ba12-rank0.pt")
    assert newest_complete(folder) == folder / "ep0-ba8-rank0.pt"
    (folder / LATEST).unlink()
    (folder / LATEST).symlink_to("ep0-ba12-rank0.pt")

    assert resumed_at(train(config, "run_name=torn")) == 8
    assert_bitwise_equal(final_state(reference[1]), final_state(folder))


def test_pruning_counts_no_checkpoint_beyond_latest(reference, tmp_path):
    """A torn file from an earlier start (beyond the resume point, rewritten when the run gets there) does not
    count among the newest `keep`: the whole ones stay."""
    folder = tmp_path / "run"
    folder.mkdir()
    for batch in (4, 8):
        shutil.copy(reference[1] / f"ep0-ba{batch}-rank0.pt", folder)
    (folder / "ep0-ba12-rank0.pt").write_bytes((folder / "ep0-ba8-rank0.pt").read_bytes()[:5000])
    (folder / LATEST).symlink_to("ep0-ba8-rank0.pt")
    KeepNewestPeriodic(folder, keep=2, early=set()).batch_checkpoint(SimpleNamespace(), None)
    assert sorted(checkpoints(folder)) == [4, 8, 12]

    KeepNewestPeriodic(folder, keep=1, early=set()).batch_checkpoint(SimpleNamespace(), None)
    assert sorted(checkpoints(folder)) == [8, 12]  # latest is never pruned


def test_a_torn_checkpoint_is_never_uploaded(fake_hub, reference, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for batch in (4, 8):
        shutil.copy(reference[1] / f"ep0-ba{batch}-rank0.pt", folder)
    torn = torn_copies(reference[1] / "ep0-ba12-rank0.pt", tmp_path / "torn")
    os.replace(next(p for how, p in torn.items() if how.startswith("exception before storage 1 ")),
               folder / "ep0-ba12-rank0.pt")
    publisher = HubPublisher(Hub(), "me/torn", folder, export=False)
    assert publisher.catch_up(up_to_batch=12) == (2, 0)
    publisher.drain()
    on_hub = fake_hub.repo_dir("me/torn") / "checkpoints"
    assert sorted(p.name for p in on_hub.glob("ep*.pt")) == ["ep0-ba4-rank0.pt", "ep0-ba8-rank0.pt"]
    assert (on_hub / "ep0-ba8-rank0.pt").read_bytes() == (folder / "ep0-ba8-rank0.pt").read_bytes()
