"""The workarounds of third-party behaviour (slm/core/*workarounds.py): nothing is patched on import, `applied()` undoes
what it does, and each refuses, in one line, a version of the package it was not written for."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import warnings
from datetime import timedelta
from importlib import metadata
from types import SimpleNamespace

import pytest
import torch
from composer.core import Callback, Engine, Event
from composer.trainer import Trainer
from composer.utils import dist

from slm.core import composer_workarounds, wandb_workarounds, workarounds
from slm.core.errors import SlmError
from slm.train import main as train_main

from helpers import REPO

pytestmark = pytest.mark.stack  # CI runs this module on the current stack too (make test-stack)

DISPATCH = ("_run_loggers", "_run_nonlogger_callbacks", "_run_algorithms")


def test_importing_train_patches_nothing():
    code = ("import warnings\n"
            "import composer.utils.dist as d; original = d.get_node_signal_file_name\n"
            "from composer.core import Engine; debug_log = Engine._debug_log\n"
            "import slm.train, slm.training.trainer\n"
            "assert d.get_node_signal_file_name is original, 'Composer patched on import'\n"
            "assert Engine._debug_log is debug_log, 'Composer patched on import'\n"
            "ours = [f for f in warnings.filters if f[1] and 'ProgressBar' in f[1].pattern]\n"
            "assert not ours, f'warning filters installed on import: {ours}'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_version_check_imports_none_of_the_libraries():
    """slm/data/mapped_shards.py and slm/analysis/batches.py ask for the versions; that loads no library."""
    code = ("import sys; import slm.core.workarounds\n"
            "heavy = sorted({'composer', 'streaming', 'wandb', 'torch'} & {m.split('.')[0] for m in sys.modules})\n"
            "assert not heavy, f'slm.core.workarounds imports {heavy}'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("own", ["composer", "streaming", "wandb"])
def test_each_library_s_workarounds_import_only_that_library(own):
    module = REPO / "slm" / "core" / f"{own}_workarounds.py"
    imported = {alias.name.split(".")[0] for node in ast.parse(module.read_text()).body
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.parse(module.read_text()).body
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported & {"composer", "streaming", "wandb"} <= {own}, f"{module.name} imports {imported}"


def test_applied_patches_for_the_run_and_restores(monkeypatch):
    monkeypatch.delenv("ENGINE_DEBUG", raising=False)
    original, filters, debug_log = dist.get_node_signal_file_name, list(warnings.filters), Engine._debug_log
    dispatch, all_reduce = [getattr(Engine, n) for n in DISPATCH], dist.all_reduce
    with composer_workarounds.applied():
        assert [getattr(Engine, n) for n in DISPATCH] != dispatch and dist.all_reduce is not all_reduce
        assert dist.get_node_signal_file_name is not original
        assert dist.get_node_signal_file_name().endswith("-node0")
        assert warnings.filters != filters
        assert Engine._debug_log is not debug_log
    assert dist.get_node_signal_file_name is original
    assert warnings.filters == filters
    assert Engine._debug_log is debug_log
    assert [getattr(Engine, n) for n in DISPATCH] == dispatch and dist.all_reduce is all_reduce
    monkeypatch.setenv("ENGINE_DEBUG", "1")  # asked for: Composer's own debug log and dispatch stay
    with composer_workarounds.applied():
        assert Engine._debug_log is debug_log
        assert [getattr(Engine, n) for n in DISPATCH] == dispatch


class Answers(Callback):
    def __init__(self, calls: list, name: str):
        self.calls, self.name = calls, name

    def batch_end(self, state, logger):
        self.calls.append(self.name)


class Every(Callback):
    def __init__(self, calls: list):
        self.calls = calls

    def run_event(self, event, state, logger):
        self.calls.append(f"every {event.value}")


def test_quick_dispatch_runs_the_same_callbacks_in_the_same_order():
    """Only callbacks that answer an event are called, in state.callbacks' order, and a change to that list is seen."""
    calls: list = []
    first, every, last = Answers(calls, "first"), Every(calls), Answers(calls, "last")
    state = SimpleNamespace(callbacks=[first, Callback(), every, last], profiler=None, algorithms=[])
    engine = SimpleNamespace(state=state, logger=None)
    with composer_workarounds.quick_event_dispatch():
        for event in (Event.BATCH_END, Event.BEFORE_LOSS):
            Engine._run_nonlogger_callbacks(engine, event)
        state.callbacks.remove(first)
        Engine._run_nonlogger_callbacks(engine, Event.BATCH_END)
        assert Event.AFTER_LOSS.is_after_event and not Event.AFTER_LOSS.is_before_event
        assert Event.BEFORE_LOSS.is_before_event and not Event.BATCH_END.is_before_event
        assert Engine._run_algorithms(engine, Event.BATCH_END) == {}
    assert calls == ["first", "every batch_end", "last", "every before_loss", "every batch_end", "last"]


def test_collectives_in_one_process_leave_their_tensors_as_they_are():
    tensor = torch.tensor([3.0, 4.0])
    with composer_workarounds.single_process_collectives():
        dist.all_reduce(tensor, "MAX")
        dist.broadcast(tensor, src=0)
        assert Trainer._accumulate_time_across_ranks(None, 8, 512, timedelta(seconds=0.5)) == (
            8, 512, timedelta(seconds=0.5))
    assert tensor.tolist() == [3.0, 4.0]


@pytest.mark.parametrize("use", [
    lambda: composer_workarounds.applied().__enter__(),
    lambda: composer_workarounds.ResumableProgressBar(),
    lambda: composer_workarounds.WandB(project="x"),
], ids=["applied", "progress bar", "wandb logger"])
def test_another_composer_version_is_refused_in_one_line(monkeypatch, use):
    monkeypatch.setitem(workarounds.WRITTEN_FOR, "mosaicml", ("0.31.0",))
    with pytest.raises(SlmError, match=r"written for mosaicml 0.31.0, but 0.32.1 is installed") as err:
        use()
    assert "\n" not in str(err.value)
    assert dist.get_node_signal_file_name.__module__ == "composer.utils.dist"


def test_another_wandb_version_is_refused(monkeypatch):
    monkeypatch.setitem(workarounds.WRITTEN_FOR, "wandb", ("0.17", "0.19"))
    installed = re.escape(metadata.version("wandb"))
    with pytest.raises(SlmError, match=rf"W&B login check .* written for wandb 0.17 or 0.19, but {installed} is "
                                       "installed: install wandb 0.17,"):
        wandb_workarounds.check_wandb_login("p")


@pytest.mark.parametrize("package", sorted(workarounds.WRITTEN_FOR))
def test_the_installed_versions_are_the_ones_written_for(package):
    workarounds.require(package, "this test")  # each stack's lock file (stacks/) installs one of them


def test_train_says_so_before_anything_starts(monkeypatch, capsys):
    monkeypatch.setitem(workarounds.WRITTEN_FOR, "mosaicml", ("0.31.0",))
    assert train_main([str(REPO / "yamls" / "demo-llama.yaml")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slm train: error: slm's workaround for the node signal file")
