"""The two stacks (stacks/, docs/design.md "The stack"): their lock files say what pyproject.toml and the overrides
ask for, and an export written by either loads the same model in the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement

from slm.training.export import export_checkpoint

from helpers import REPO, train, write_yaml

STACKS = REPO / "stacks"


def locked(lock: Path) -> dict[str, list[str]]:
    """package -> the versions a lock file pins (a universal lock may pin one per Python version)."""
    pins: dict[str, list[str]] = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split(";")[0].strip().split("==")
            pins.setdefault(name.lower(), []).append(version)
    return pins


def requirements(path: Path) -> list[Requirement]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def project_requirements() -> list[Requirement]:
    """slm's own requirements and its `dev` extra's, as installed from pyproject.toml (`make venv`)."""
    wanted = [Requirement(r) for r in metadata.requires("slm")]
    return [r for r in wanted if r.marker is None or r.marker.evaluate({"extra": "dev"})]


@pytest.mark.stack
@pytest.mark.parametrize("stack", ["pinned", "current"])
def test_each_lock_file_pins_what_its_stack_asks_for(stack):
    """After a change to pyproject.toml or stacks/current-overrides.txt without `make lock`, this fails."""
    pins = locked(STACKS / f"{stack}.txt")
    overrides = {r.name.lower(): r for r in requirements(STACKS / "current-overrides.txt")} if stack == "current" \
        else {}
    for requirement in project_requirements():
        wanted = overrides.get(requirement.name.lower(), requirement)
        versions = pins.get(requirement.name.lower())
        assert versions, f"stacks/{stack}.txt has no {requirement.name}: run `make lock`"
        assert all(wanted.specifier.contains(v) for v in versions), \
            f"stacks/{stack}.txt pins {requirement.name} {versions}, not {wanted.specifier}: run `make lock`"
    for name, override in overrides.items():
        assert all(override.specifier.contains(v) for v in pins[name]), f"{name} {pins[name]} is not {override}"


def other_stack() -> Path:
    """The Python of the stack this test session is not running on, or a skip saying how to install it."""
    venvs = {"pinned": REPO / ".venv", "current": REPO / ".venv-current"}
    here = Path(sys.prefix).resolve()
    name, venv = next((n, v) for n, v in venvs.items() if v.resolve() != here)
    if not (venv / "bin" / "python").exists():
        pytest.skip(f"the {name} stack is not installed here: make venv STACK={name}")
    return venv / "bin" / "python"


# In the other stack: export the checkpoint there, and compute the logits of this stack's export.
OTHER_SIDE = """
import sys, json, torch, transformers
from pathlib import Path
from slm.training.export import export_checkpoint
checkpoint, ours, theirs, ids = sys.argv[1:]
export_checkpoint(Path(checkpoint), Path(theirs))
model = transformers.AutoModelForCausalLM.from_pretrained(ours).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(ids)).logits, Path(ids).with_suffix('.logits'))
print(json.dumps({"transformers": transformers.__version__, "inv_freq": model.model.rotary_emb.inv_freq.tolist()}))
"""


@pytest.mark.train
def test_an_export_loads_the_same_model_in_the_other_stack(tmp_path, shards):
    """A non-default rope theta is what transformers 4 would silently drop from a transformers 5 config.json.
    Both directions in one run, so CI runs it once, in the pinned suite (not marked `stack`)."""
    python = other_stack()
    config = write_yaml(tmp_path / "run.yaml", shards, rope_theta=2500.0)
    train(config, "run_name=cross", "max_duration=4ba", "eval_interval=4ba")
    checkpoint = tmp_path / "ckpt" / "cross" / "latest-rank0.pt"
    ours, theirs, ids = tmp_path / "ours", tmp_path / "theirs", tmp_path / "ids.pt"
    export_checkpoint(checkpoint, ours)
    torch.save(torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0)), ids)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(python), "-c", OTHER_SIDE, str(checkpoint), str(ours), str(theirs), str(ids)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    there = json.loads(proc.stdout.splitlines()[-1])
    assert there["transformers"].split(".")[0] != transformers.__version__.split(".")[0]
    with torch.no_grad():
        reference = transformers.AutoModelForCausalLM.from_pretrained(ours).eval()
        expected = reference(input_ids=torch.load(ids)).logits
        assert reference.model.rotary_emb.inv_freq[1].item() == pytest.approx(2500.0 ** (-2 / 16))
        # this stack's export, read there; the other stack's export, read here
        assert there["inv_freq"] == pytest.approx(reference.model.rotary_emb.inv_freq.tolist())
        assert torch.allclose(torch.load(ids.with_suffix(".logits")), expected, atol=1e-5, rtol=1e-5)
        theirs_here = transformers.AutoModelForCausalLM.from_pretrained(theirs).eval()
        assert torch.allclose(theirs_here(input_ids=torch.load(ids)).logits, expected, atol=1e-5, rtol=1e-5)
