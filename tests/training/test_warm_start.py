"""Warm starts: a new run branched off another run's checkpoint (a file, a run folder, a Hub repo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slm.core.trust import unpickle_checkpoint

from helpers import assert_bitwise_equal, final_state, train_stderr, write_yaml

pytestmark = pytest.mark.train
QUIET = ["eval_interval=100ba", "hub.export=false"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, shards) -> tuple[Path, Path]:
    """A 16-batch run to branch off (its config, its folder)."""
    root = tmp_path_factory.mktemp("warm-source")
    config = write_yaml(root / "tiny.yaml", shards)
    from slm.train import main

    assert main([str(config), "run_name=source", *QUIET]) == 0
    return config, root / "ckpt" / "source"


def weights(path: Path) -> dict[str, torch.Tensor]:
    state = unpickle_checkpoint(path)["state"]
    return {k.removeprefix("model."): v for k, v in state["model"].items()}


def test_a_branch_off_a_run_folder_starts_from_its_newest_weights(source, tmp_path):
    """weights_only (the default): the source's weights, a fresh optimizer, schedule and batch count."""
    from slm.core.config import load_config
    from slm.training.trainer import start_run

    config, folder = source
    run = [f"save_folder={tmp_path}/{{run_name}}", f"load.path={folder}", "max_duration=4ba", *QUIET]
    trainer = start_run(load_config(config, ["run_name=cooldown", *run])).trainer
    loaded = trainer.state.model.model.state_dict()
    trainer.close()
    expected = weights(folder / "ep0-ba16-rank0.pt")
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)

    recipe = tmp_path / "cooldown.yaml"  # a second yaml composed over the run's own, as a cooldown recipe would be
    recipe.write_text("scheduler: {name: linear, warmup: 0ba}\noptimizer: {lr: 1.0e-3}\n")
    err = train_stderr(config, recipe, "run_name=cooldown", *run)
    assert f"cooldown: starting at batch 0 of 4ba, branched off {folder}/ep0-ba16-rank0.pt (its weights)" in err
    info = json.loads((tmp_path / "cooldown" / "run.json").read_text())
    assert info["warm_start"] == {"path": str(folder), "revision": None, "checkpoint": f"{folder}/ep0-ba16-rank0.pt",
                                  "batch": 16, "weights_only": True}
    assert info["config"]["configs"] == [str(config), str(recipe)] and info["config"]["scheduler"]["name"] == "linear"
    state = final_state(tmp_path / "cooldown")
    assert state["timestamp"]["Timestamp"]["batch"] == 4  # its own count
    assert state["callbacks"]["RunInfo"]["warm_start"]["batch"] == 16  # in every checkpoint, so in every export
    # restarted, the branch resumes itself, not the source
    again = train_stderr(config, recipe, "run_name=cooldown", *run)
    assert "cooldown: resumed at batch 4 of 4ba; already finished" in again and "branched" not in again


def test_a_branch_with_the_whole_state_goes_on_as_the_source_would(source, tmp_path):
    """load.weights_only=false off batch 8 of the 16-batch source, to 16: bitwise the source's batch 16."""
    config, folder = source
    err = train_stderr(config, "run_name=branch", f"save_folder={tmp_path}/{{run_name}}", *QUIET,
                     f"load.path={folder}/ep0-ba8-rank0.pt", "load.weights_only=false")
    assert "branch: starting at batch 8 of 16ba, branched off" in err and "(its whole state)" in err
    assert_bitwise_equal(final_state(folder), final_state(tmp_path / "branch"))
    info = json.loads((tmp_path / "branch" / "run.json").read_text())
    assert info["run_name"] == "branch" and [s["batch"] for s in info["starts"]] == [8]  # its own history


def test_a_branch_off_a_hub_repo_checkpoint(source, tmp_path, fake_hub):
    config, folder = source
    fake_hub.create_repo("org/source", private=True)
    for batch in (4, 8):
        fake_hub.upload_file(path_or_fileobj=str(folder / f"ep0-ba{batch}-rank0.pt"), repo_id="org/source",
                             path_in_repo=f"checkpoints/ep0-ba{batch}-rank0.pt")
    run = [f"save_folder={tmp_path}/{{run_name}}", "load.path=org/source", "max_duration=2ba", *QUIET]
    train_stderr(config, "run_name=from-hub", *run, "load.revision=ba4")
    got = tmp_path / "from-hub" / "warm-start" / "ep0-ba4-rank0.pt"
    assert got.read_bytes() == (folder / "ep0-ba4-rank0.pt").read_bytes()
    assert json.loads((tmp_path / "from-hub" / "run.json").read_text())["warm_start"]["batch"] == 4
    err = train_stderr(config, "run_name=bad-revision", *run, "load.revision=ba5", status=1)
    assert "load.revision ba5: the Hub repo org/source has no checkpoint at that batch; it has ba4, ba8" in err
    train_stderr(config, "run_name=newest", *run)
    assert json.loads((tmp_path / "newest" / "run.json").read_text())["warm_start"]["batch"] == 8


@pytest.mark.parametrize(("run_name", "override", "message"), [
    ("source", "load.path={source}", "load.path {source} is in this run's own folder: a warm start makes a new run"),
    ("fresh", "load.path={tmp}/nowhere", "load.path {tmp}/nowhere not found: give a checkpoint file, a run folder"),
    ("fresh", "load.path={tmp}", "load.path {tmp} holds no complete checkpoint"),
])
def test_a_bad_warm_start_is_one_line(source, tmp_path, run_name, override, message):
    config, folder = source
    values = {"source": folder, "tmp": tmp_path}
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    save = folder.parent if run_name == "source" else tmp_path
    err = train_stderr(config, f"run_name={run_name}", f"save_folder={save}/{{run_name}}",
                     override.format(**values), *QUIET, status=1)
    assert err.startswith("slm train: error: " + message.format(**values)) and len(err.splitlines()) == 1, err
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_a_checkpoint_of_another_model_is_refused(source, tmp_path):
    config, folder = source
    err = train_stderr(config, "run_name=wide", f"save_folder={tmp_path}/{{run_name}}", f"load.path={folder}",
                     "model.hidden_size=64", *QUIET, status=1)
    assert "does not fit this model (size mismatch for" in err and "load.path must be a checkpoint of a model" in err


def test_a_run_from_a_pretrained_hf_model(source, tmp_path):
    """model.pretrained: the export of the source's checkpoint, as any HF folder; its card says where it came from."""
    from slm.core.config import load_config
    from slm.training.export import export_checkpoint
    from slm.training.trainer import start_run

    config, folder = source
    hf = export_checkpoint(folder / "ep0-ba8-rank0.pt", tmp_path / "hf")
    run = [f"save_folder={tmp_path}/{{run_name}}", "model={pretrained: " + str(hf) + "}", "max_duration=2ba", *QUIET]
    trainer = start_run(load_config(config, ["run_name=tuned", *run])).trainer
    loaded = trainer.state.model.model.state_dict()
    trainer.close()
    expected = weights(folder / "ep0-ba8-rank0.pt")
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    train_stderr(config, "run_name=tuned", *run)
    card = (export_checkpoint(tmp_path / "tuned" / "latest-rank0.pt", tmp_path / "tuned-hf") / "README.md").read_text()
    assert f"| weights from | the pretrained model `{hf}` |" in card

    err = train_stderr(config, "run_name=wrong", *run, "model.vocab_size=4096", status=1)
    assert f"model.vocab_size = 4096 but model.pretrained {hf} has 512: drop model.vocab_size" in err
    err = train_stderr(config, "run_name=absent", *run[:1], f"model.pretrained={tmp_path}/none", status=1)
    assert f"cannot load model.pretrained {tmp_path}/none" in err and len(err.splitlines()) == 1


def test_the_model_card_names_the_checkpoint_a_branch_came_from(source, tmp_path):
    from slm.training.export import export_checkpoint

    config, folder = source
    train_stderr(config, "run_name=twig", f"save_folder={tmp_path}/{{run_name}}", f"load.path={folder}",
               "max_duration=1ba", *QUIET)
    card = (export_checkpoint(tmp_path / "twig" / "latest-rank0.pt", tmp_path / "hf") / "README.md").read_text()
    assert f"| weights from | branched off `{folder}` at batch 16 (its weights) |" in card
