"""The workarounds of third-party behaviour (slm/workarounds.py): nothing is patched on import, `applied()` undoes
what it does, and each refuses, in one line, a version of the package it was not written for."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from importlib import metadata

import pytest
from composer.core import Engine
from composer.utils import dist

from slm import workarounds
from slm.errors import SlmError
from slm.train import main as train_main

from conftest import REPO

pytestmark = pytest.mark.stack  # CI runs this module on the current stack too (make test-stack)


def test_importing_train_patches_nothing():
    code = ("import warnings\n"
            "import composer.utils.dist as d; original = d.get_node_signal_file_name\n"
            "from composer.core import Engine; debug_log = Engine._debug_log\n"
            "import slm.train\n"
            "assert d.get_node_signal_file_name is original, 'Composer patched on import'\n"
            "assert Engine._debug_log is debug_log, 'Composer patched on import'\n"
            "ours = [f for f in warnings.filters if f[1] and 'ProgressBar' in f[1].pattern]\n"
            "assert not ours, f'warning filters installed on import: {ours}'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_applied_patches_for_the_run_and_restores(monkeypatch):
    monkeypatch.delenv("ENGINE_DEBUG", raising=False)
    original, filters, debug_log = dist.get_node_signal_file_name, list(warnings.filters), Engine._debug_log
    with workarounds.applied():
        assert dist.get_node_signal_file_name is not original
        assert dist.get_node_signal_file_name().endswith("-node0")
        assert warnings.filters != filters
        assert Engine._debug_log is not debug_log
    assert dist.get_node_signal_file_name is original
    assert warnings.filters == filters
    assert Engine._debug_log is debug_log
    monkeypatch.setenv("ENGINE_DEBUG", "1")  # asked for: Composer's own debug log stays
    with workarounds.applied():
        assert Engine._debug_log is debug_log


@pytest.mark.parametrize("use", [
    lambda: workarounds.applied().__enter__(),
    lambda: workarounds.ResumableProgressBar(),
    lambda: workarounds.WandB(project="x"),
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
        workarounds.check_wandb_login("p")


@pytest.mark.parametrize("package", sorted(workarounds.WRITTEN_FOR))
def test_the_installed_versions_are_the_ones_written_for(package):
    workarounds.require(package, "this test")  # each stack's lock file (stacks/) installs one of them


def test_train_says_so_before_anything_starts(monkeypatch, capsys):
    monkeypatch.setitem(workarounds.WRITTEN_FOR, "mosaicml", ("0.31.0",))
    assert train_main([str(REPO / "yamls" / "demo-llama.yaml")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slm train: error: slm's workaround for the node signal file")
