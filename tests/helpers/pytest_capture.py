"""Training and the `slm` command in the pytest process, their output captured as a subprocess's would be: the
one place that relies on pytest's internals (written for pytest 9.2: the `capturemanager` plugin's `is_capturing()`,
`_capture_fixture` and `read_global_capture()`). conftest.py's pytest_configure hands over the session's config."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

CONFIG: list[pytest.Config] = []  # the session's, set by conftest.py


def capture_manager():
    """pytest's capture manager, while its own capture (not a test's capfd or capsys) takes this process's output."""
    capman = CONFIG[0].pluginmanager.getplugin("capturemanager") if CONFIG else None
    return capman if capman is not None and capman.is_capturing() == "global" and not capman._capture_fixture else None


def run_in_this_process(main: Callable[[list[str]], int], argv: list[str], capman, cwd: Path,
                        name: str) -> subprocess.CompletedProcess:
    """An entry point's `main` (slm/train.py's, the `slm` command's) here, as a process `name` would run it: from
    `cwd`, its output and warnings captured."""
    capman.read_global_capture()  # what came before belongs to the test
    before = os.getcwd()
    os.chdir(cwd)
    # A process's warnings reach stderr through logging's last resort; pytest's own handlers stand in its way here.
    logging.root.addHandler(logging.lastResort)
    try:
        status = main(argv)
    except SystemExit as e:  # argparse
        status = e.code if isinstance(e.code, int) else 1
    finally:
        logging.root.removeHandler(logging.lastResort)
        os.chdir(before)
        out, err = capman.read_global_capture()
    return subprocess.CompletedProcess([name, *argv], status, out, err)
