"""The trust boundary (docs/security.md): what others hand over (checkpoints, Hub repos, shard folders, remotes) never
runs code, never leads outside its folder, and no secret reaches a file or a message.

Each test plants what an attacker would, in real files read by the real commands: a checkpoint whose pickle would
create a marker file, an index.json whose shard names climb out of the folder, a `latest` pointer and a manifest
naming other paths. The marker never appears, nothing outside the folder changes, and the error is one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from slm.cli import main
from slm.hub.manifest import MANIFEST, file_record

from helpers import edited_tokenizer, hub_double, plant_payload, swap_a_b, train, train_stderr, write_yaml

pytestmark = pytest.mark.train
QUIET = ["eval_interval=100ba", "hub.export=false"]
EVIL = "org/evil"


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line and ": " in line]


@pytest.fixture(scope="module")
def source(tmp_path_factory, shards) -> SimpleNamespace:
    """An 8-batch run of this machine's own (its config, folder and newest checkpoint)."""
    root = tmp_path_factory.mktemp("trusted")
    config = write_yaml(root / "tiny.yaml", shards)
    train(config, "run_name=source", "max_duration=8ba", *QUIET)
    folder = root / "ckpt" / "source"
    return SimpleNamespace(config=config, folder=folder, newest=folder / "ep0-ba8-rank0.pt")


@pytest.mark.stack
@pytest.mark.parametrize("command", [
    ["export", "{pt}", "--out-dir", "{tmp}/out"],
    ["eval", "{pt}", "--data", "{shards}/eval"],
    ["logprobs", "{pt}", "--data", "{shards}/eval", "--out-dir", "{tmp}/out"],
], ids=lambda c: c[0])
def test_a_checkpoint_carrying_code_is_refused_by_every_command(source, tmp_path, shards, capsys, command):
    marker = tmp_path / "MARKER"
    pt = plant_payload(source.newest, tmp_path / "given" / "ep0-ba8-rank0.pt", marker)
    code = main([a.format(pt=pt, tmp=tmp_path, shards=shards) for a in command])
    err = capsys.readouterr().err
    assert code == 1 and error_lines(err) == [f"slm {command[0]}: error: refused checkpoint {pt}: its pickle names "
                                              "io.open, which slm checkpoints never hold and which would run code on "
                                              "loading (docs/security.md); nothing of it was loaded"], err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.stack
@pytest.mark.parametrize("how", ["warm start off a file", "warm start off a folder", "resume of a folder handed over"])
def test_a_run_off_a_checkpoint_carrying_code_is_refused(source, tmp_path, how):
    """The checkpoint is read by slm's own check (warm starts) and by Composer's autoresume (a run folder with its
    run.json, which slm compares without reading the checkpoint): both go through the gate."""
    marker = tmp_path / "MARKER"
    handed = tmp_path / "ckpt" / "handed"
    shutil.copytree(source.folder, handed, symlinks=True)
    pt = plant_payload(source.newest, handed / source.newest.name, marker)
    run = {"warm start off a file": ["run_name=branch", f"save_folder={tmp_path}/{{run_name}}", f"load.path={pt}"],
           "warm start off a folder": ["run_name=branch", f"save_folder={tmp_path}/{{run_name}}",
                                       f"load.path={handed}"],
           "resume of a folder handed over": ["run_name=handed", f"save_folder={tmp_path}/ckpt/{{run_name}}",
                                              "max_duration=12ba"]}[how]
    before = sorted(p.name for p in handed.iterdir())
    err = train_stderr(source.config, *run, *QUIET, status=1)
    assert error_lines(err) == [f"slm train: error: refused checkpoint {pt}: its pickle names io.open, which slm "
                                "checkpoints never hold and which would run code on loading (docs/security.md); "
                                "nothing of it was loaded"], err
    assert not marker.exists()
    assert sorted(p.name for p in handed.iterdir()) == before
    assert not (tmp_path / "branch" / "config.yaml").exists()


def test_export_refuses_a_tokenizer_other_than_the_runs(source, tmp_path, tokenizer_dir, capsys):
    """The checkpoint names its tokenizer's folder; another tokenizer found there would ship with the model."""
    import torch

    from slm.core.trust import unpickle_checkpoint

    swapped = edited_tokenizer(tokenizer_dir, tmp_path / "tok", swap_a_b)
    state = unpickle_checkpoint(source.newest)
    state["state"]["callbacks"]["RunInfo"]["tokenizer"] = str(swapped)
    torch.save(state, tmp_path / "moved.pt")
    assert main(["export", str(tmp_path / "moved.pt"), "--out-dir", str(tmp_path / "out")]) == 1
    assert error_lines(capsys.readouterr().err) == [
        f"slm export: error: tokenizer {swapped} is not the one the run of {tmp_path / 'moved.pt'} trained with "
        "(content hashes differ): the export would ship another tokenizer; put the run's tokenizer there"]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def published(tmp_path_factory, shards) -> SimpleNamespace:
    """A real run published to the Hub double, as its owner would before planting anything."""
    root = tmp_path_factory.mktemp("published")
    with pytest.MonkeyPatch.context() as monkeypatch:
        api = hub_double(root / "hub", monkeypatch)
        config = write_yaml(root / "tiny.yaml", shards)
        train(config, "run_name=evil", f"hub.repo={EVIL}", "max_duration=8ba", *QUIET)
    return SimpleNamespace(hub=api.root, config=config, run=root / "ckpt" / "evil")


@pytest.fixture
def evil(published, tmp_path, monkeypatch) -> SimpleNamespace:
    """A copy of the published repo whose newest checkpoint carries a payload, its manifest record updated to match
    (as the repo's owner could)."""
    api = hub_double(tmp_path / "hub", monkeypatch)
    shutil.copytree(published.hub, api.root, dirs_exist_ok=True)
    main_branch = api.repo_dir(EVIL)
    marker = tmp_path / "MARKER"
    planted = plant_payload(published.run / "ep0-ba8-rank0.pt", main_branch / "checkpoints" / "ep0-ba8-rank0.pt",
                            marker)
    manifest = json.loads((main_branch / MANIFEST).read_text())
    for entry in manifest["checkpoints"]:
        if entry["batch"] == 8:
            entry["checkpoint"].update(file_record(planted))
    (main_branch / MANIFEST).write_text(json.dumps(manifest))
    return SimpleNamespace(main=main_branch, marker=marker, config=published.config)


def test_a_warm_start_off_a_hub_repo_carrying_code_is_refused(evil, tmp_path):
    err = train_stderr(evil.config, "run_name=branch", f"save_folder={tmp_path}/{{run_name}}", f"load.path={EVIL}",
                       *QUIET, status=1)
    got = tmp_path / "branch" / "warm-start" / "ep0-ba8-rank0.pt"
    assert error_lines(err) == [f"slm train: error: refused checkpoint {got}: its pickle names io.open, which slm "
                                "checkpoints never hold and which would run code on loading (docs/security.md); "
                                "nothing of it was loaded"], err
    assert not evil.marker.exists() and not (tmp_path / "branch" / "config.yaml").exists() and not got.exists()


def test_autoresume_from_a_hub_repo_carrying_code_is_refused(evil, tmp_path):
    """No local checkpoint: Composer follows the repo's `latest` pointer, downloads and loads what it names."""
    err = train_stderr(evil.config, "run_name=mirror", f"save_folder={tmp_path}/{{run_name}}", f"hub.repo={EVIL}",
                       *QUIET, status=1)
    assert len(error_lines(err)) == 1 and "error: refused checkpoint " in err and "its pickle names io.open" in err
    assert not evil.marker.exists() and not (tmp_path / "mirror" / "config.yaml").exists()


def test_a_latest_pointer_leading_elsewhere_is_refused(evil, tmp_path):
    (evil.main / "checkpoints" / "latest-rank0.pt.symlink").write_text("../../other/repo/ep0-ba8-rank0.pt")
    err = train_stderr(evil.config, "run_name=mirror", f"save_folder={tmp_path}/{{run_name}}", f"hub.repo={EVIL}",
                       *QUIET, status=1)
    assert error_lines(err) == [f"slm train: error: the Hub repo {EVIL}'s checkpoints/latest-rank0.pt.symlink names "
                                "'../../other/repo/ep0-ba8-rank0.pt', which is no checkpoint of an slm run "
                                "(checkpoints/ep{E}-ba{B}-rank0.pt): refused (docs/security.md)"], err


def test_deep_verify_reports_a_checkpoint_carrying_code_and_runs_none(evil, capsys):
    code = main(["verify", EVIL, "--deep", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and [(f["kind"], f["batch"]) for f in report["faults"]] == [("refused_checkpoint", 8)]
    assert "refused checkpoint checkpoints/ep0-ba8-rank0.pt: its pickle names io.open" in report["faults"][0]["message"]
    assert not evil.marker.exists()


def test_a_manifest_naming_a_path_outside_the_checkpoints_is_refused(evil, capsys):
    manifest = json.loads((evil.main / MANIFEST).read_text())
    manifest["checkpoints"][0]["checkpoint"]["path"] = "../../../outside.pt"
    (evil.main / MANIFEST).write_text(json.dumps(manifest))
    code = main(["verify", EVIL, "--deep", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and ("bad_manifest", None) in [(f["kind"], f["batch"]) for f in report["faults"]]
    assert "names '../../../outside.pt', which is no checkpoint of an slm run" in json.dumps(report["faults"])
    assert not evil.marker.exists()


def escaping_copy(shards: Path, out: Path, part: str, name: str) -> Path:
    """A copy of the train shards whose index.json names its first shard's `part` (raw_data, zip_data) `name`."""
    shutil.copytree(shards / "train", out)
    index = json.loads((out / "index.json").read_text())
    index["shards"][0][part]["basename"] = name
    (out / "index.json").write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("where", ["local", "remote"])
@pytest.mark.parametrize(("part", "name"), [
    ("raw_data", "../../ESCAPED.mds"),  # decompressed, or downloaded, to there
    ("zip_data", "../../precious.txt"),  # read, downloaded over, deleted once decompressed (with a remote)
])
def test_shard_names_leading_outside_the_folder_are_refused(tmp_path, shards, where, part, name):
    """The folder is someone else's: a copy in this machine's tmp_path/a/train, or their remote (a folder standing in
    for hf://), cached in tmp_path/cache/train; either way the names lead to tmp_path, where the remote's owner
    also put the file they want downloaded."""
    (tmp_path / "precious.txt").write_text("precious")
    if where == "local":
        bad = escaping_copy(shards, tmp_path / "a" / "train", part, name)
        data, index = [f"data.train.local={bad}"], bad / "index.json"
    else:
        bad = escaping_copy(shards, tmp_path / "remote" / "x" / "train", part, name)
        (tmp_path / "remote" / "ESCAPED.mds").write_text("their content")
        data = [f"data.train.remote={bad}", f"data.train.local={tmp_path}/cache/train"]
        index = tmp_path / "cache" / "train" / "index.json"
    err = train_stderr(write_yaml(tmp_path / "tiny.yaml", shards), *data, "max_duration=2ba", *QUIET, status=1)
    assert error_lines(err) == [f"slm train: error: shard index {index}, shard 0: {part}.basename names {name!r}, "
                                "which is not a relative path below its folder: refused, since it would lead "
                                "outside its folder (docs/security.md)"], err
    assert (tmp_path / "precious.txt").read_text() == "precious" and not (tmp_path / "ESCAPED.mds").exists()


def test_streaming_itself_is_kept_inside_the_folder(tmp_path, shards):
    """What slm's own check does not cover (`slm batches`, a notebook): Streaming's reading of index.json. Stock
    Streaming decompresses a shard named `../../ESCAPED.mds` two folders up; under slm's workaround it never opens
    the dataset."""
    from streaming import Stream, StreamingDataset

    from slm.core.errors import Refused
    from slm.core.streaming_workarounds import (
        prefix_registered_under_node_lock,
        shared_memory_released,
        streaming_datasets,
    )

    bad = escaping_copy(shards, tmp_path / "a" / "train", "raw_data", "../../ESCAPED.mds")
    for streams in ({"local": str(bad)}, {"streams": [Stream(local=str(bad))]}):  # a folder, a mixture
        with streaming_datasets(), pytest.raises(Refused, match="names '../../ESCAPED.mds'"):
            StreamingDataset(**streams, batch_size=1)
    assert not (tmp_path / "ESCAPED.mds").exists()
    assert not hasattr(Stream.get_shards, "__wrapped__")  # undone on exit: Streaming is as installed
    with prefix_registered_under_node_lock(), shared_memory_released():  # what the workaround stops
        StreamingDataset(local=str(bad), batch_size=1)[0]
    assert (tmp_path / "ESCAPED.mds").exists()
    (tmp_path / "ESCAPED.mds").unlink()


def test_tokens_are_masked_in_every_message_and_traceback(tmp_path, capsys, monkeypatch):
    """A token pasted where a path was expected, with the Hub login's token (not in the environment) and a W&B key:
    the error line and the --debug traceback show *** instead."""
    import huggingface_hub.constants

    login, key = "hf_LoginTokenNeverToBeShown", "WandbKeyNeverToBeShown0123456789"
    (tmp_path / "token").write_text(login)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", key)
    for token in (login, key):
        assert main(["generate", f"./{token}", "--prompt", "x", "--debug"]) == 1
        err = capsys.readouterr().err
        assert token not in err and "model folder not found: ./*** (make one with `slm export`)" in err
        assert main(["export", f"{tmp_path}/{token}.pt", "--out-dir", str(tmp_path / "o"), "--debug"]) == 1
        err = capsys.readouterr().err
        assert token not in err and "Traceback" in err and "***" in err
