"""Commands that touch no tensor start at once: `slm status`, `slm sweep`, `slm verify` without --deep and every
`--help` import neither torch nor the libraries built on it (`import torch` alone takes seconds). Each runs in a
fresh process under `python -X importtime`, which names every module the process imported."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slm.cli import build_parser
from slm.core.config import load_config, save_config
from slm.core.run_folder import METRICS, STATE_FILE

from helpers import REPO

HEAVY = {"torch", "composer", "transformers", "streaming", "datasets", "lm_eval", "nnsight", "transformer_lens"}
IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", re.M)
SUBCOMMANDS = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)


def heavy_imports(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime ARGS` in the repository; the process and the heavy packages it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, **(env or {})})
    return proc, {name.split(".")[0] for name in IMPORTED.findall(proc.stderr)} & HEAVY


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder as training leaves it, made by hand: config.yaml, a whole checkpoint, metrics and state."""
    folder = tmp_path_factory.mktemp("runs") / "light"
    folder.mkdir()
    save_config(load_config(REPO / "yamls" / "demo-llama.yaml", ["run_name=light"]), folder / "config.yaml")
    torch.save({"state": {"model": {"w": torch.ones(3)}}}, folder / "ep0-ba2-rank0.pt")
    (folder / METRICS).write_text("".join(json.dumps({"batch": b, "tokens": 512 * b, "loss/train/total": 5.0 / b})
                                          + "\n" for b in (1, 2)))
    (folder / STATE_FILE).write_text(json.dumps({"state": "finished", "detail": "at batch 2"}))
    return folder


@pytest.mark.parametrize("command", [[], *([name] for name in SUBCOMMANDS)], ids=lambda c: " ".join(c) or "slm")
def test_every_help_starts_without_torch(command):
    proc, heavy = heavy_imports(["-m", "slm.cli", *command, "--help"])
    ok = proc.returncode == 0 and "usage:" in proc.stdout
    assert ok, proc.stderr[-2000:]
    assert not heavy, f"slm {' '.join(command)} --help imported {sorted(heavy)}"


@pytest.mark.parametrize("script", [["slm/train.py"], ["-m", "slm.train"], ["-m", "slm.cluster.launch"],
                                    ["-m", "slm.cluster.sweep"]], ids=" ".join)
def test_the_scripts_help_starts_without_torch(script):
    proc, heavy = heavy_imports([*script, "--help"])
    ok = proc.returncode == 0 and "slm" in proc.stdout
    assert ok, proc.stderr[-2000:]
    assert not heavy, f"{' '.join(script)} --help imported {sorted(heavy)}"


def test_status_of_a_run_folder_and_of_a_yaml_starts_without_torch(run_folder):
    proc, heavy = heavy_imports(["-m", "slm.cli", "status", str(run_folder), "yamls/demo-mamba.yaml", "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    light, mamba = json.loads(proc.stdout)
    assert (light["run"], light["state"], light["batch"], light["checkpoint"]) == ("light", "finished", 2,
                                                                                  "ep0-ba2-rank0.pt")
    assert mamba["run"] == "demo-mamba"
    assert not heavy, f"slm status imported {sorted(heavy)}"


@pytest.mark.parametrize("flag", ["--dry-run", "--count"])
def test_sweep_starts_without_torch(flag):
    proc, heavy = heavy_imports(["-m", "slm.cli", "sweep", flag, "yamls/demo-llama.yaml", "--grid", "seed=1,2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "demo-llama_seed2" in proc.stdout if flag == "--dry-run" else proc.stdout.strip() == "2"
    assert not heavy, f"slm sweep {flag} imported {sorted(heavy)}"


def test_verify_without_deep_starts_without_torch(run_folder, tmp_path):
    hub_root = tmp_path / "hub"
    (hub_root / "model" / "org" / "light" / "main").mkdir(parents=True)  # the Hub double's layout: an empty repo
    proc, heavy = heavy_imports(["-m", "slm.cli", "verify", "org/light", "--run", str(run_folder)],
                                env={"SLM_TEST_HUB_ROOT": str(hub_root)})
    assert proc.returncode == 1 and "ep0-ba2-rank0.pt is not on the Hub" in proc.stdout, proc.stderr[-2000:]
    assert not heavy, f"slm verify imported {sorted(heavy)}"
