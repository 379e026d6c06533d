"""The Hub is unreachable here: the folder-backed HfApi double (tests/hub_double) stands in for it,
in this process and in the training subprocesses. Everything on our side of `HfApi` is real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from slm.checkpoints import is_complete
from slm.cli import main

from conftest import assert_bitwise_equal, final_state, resumed_at, run_slm, train, write_yaml

TOKEN = "hf_TestTokenThatMustNeverBeWrittenAnywhere"


def script_failures(api, *failures: dict) -> None:
    (api.root / "failures.json").write_text(json.dumps(list(failures)))


def calls(api, method: str) -> list[dict]:
    lines = (api.root / "calls.jsonl").read_text().splitlines()
    return [call["args"] for line in lines for call in [json.loads(line)] if call["method"] == method]


def hub_checkpoints(api, repo: str) -> dict[str, bytes]:
    folder = api.repo_dir(repo) / "checkpoints"
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else {}


def local_checkpoints(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("ep*-ba*-rank0.pt")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    """One uninterrupted 16-batch run without the Hub."""
    root = tmp_path_factory.mktemp("reference")
    train(write_yaml(root / "tiny.yaml", shards), "run_name=ref")
    return root / "ckpt" / "ref"


@pytest.mark.parametrize("local", [True, False])
def test_tokenizer_out_repo_pushes_the_saved_folder(fake_hub, tmp_path, corpus, local):
    out = ["--out-dir", str(tmp_path / "tok")] if local else []
    assert main(["tokenizer", "-i", str(corpus), "-f", "story", "-v", "300", "--out-repo", "me/tok", *out]) == 0
    repo = fake_hub.repo_dir("me/tok")
    assert (repo.parent / "private").read_text() == "True"
    assert (repo / "tokenizer.json").is_file()
    if local:
        assert (repo / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()


def test_refused_upload_is_one_clear_line(fake_hub, corpus, capsys):
    script_failures(fake_hub, {"method": "create_repo", "status": 401, "times": 1,
                               "message": "401 Client Error: Unauthorized for url: https://huggingface.co/api/repos"})
    code = main(["tokenizer", "-i", str(corpus), "-f", "story", "-v", "300", "--out-repo", "me/tok"])
    err = capsys.readouterr().err
    assert code == 1
    assert "slm tokenizer: error: creating the Hub repo me/tok failed: 401 Client Error: Unauthorized" in err
    assert len(calls(fake_hub, "create_repo")) == 1  # a 401 is not retried


@pytest.mark.train
def test_every_checkpoint_goes_to_the_hub_and_autoresume_finds_it_there(fake_hub, reference, tmp_path, shards):
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    local = tmp_path / "ckpt" / "hubrun"
    train(config, "run_name=hubrun", "hub.repo=me/tiny")
    on_hub = hub_checkpoints(fake_hub, "me/tiny")
    assert (fake_hub.repo_dir("me/tiny").parent / "private").read_text() == "True"
    assert {k: v for k, v in on_hub.items() if k.endswith(".pt")} == local_checkpoints(local)
    assert on_hub["latest-rank0.pt.symlink"] == b"checkpoints/ep0-ba16-rank0.pt"

    # The machine is lost (no local folder) and the Hub's newest checkpoint is batch 8.
    shutil.rmtree(local)
    repo = fake_hub.repo_dir("me/tiny") / "checkpoints"
    for batch in (12, 16):
        (repo / f"ep0-ba{batch}-rank0.pt").unlink()
    (repo / "latest-rank0.pt.symlink").write_text("checkpoints/ep0-ba8-rank0.pt")
    proc = train(config, "run_name=hubrun", "hub.repo=me/tiny")
    assert resumed_at(proc) == 8
    assert_bitwise_equal(final_state(reference), final_state(local))
    assert {"ep0-ba12-rank0.pt", "ep0-ba16-rank0.pt"} <= set(hub_checkpoints(fake_hub, "me/tiny"))


@pytest.mark.train
def test_transient_errors_are_retried_with_backoff(fake_hub, tmp_path, shards):
    script_failures(fake_hub, {"method": "upload_file", "status": 503, "times": 2, "match": "ep0-ba4-"},
                    {"method": "upload_file", "status": "connection", "times": 1, "match": "ep0-ba8-"})
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    proc = train(config, "run_name=flaky", "hub.repo=me/flaky", "hub.retry_wait=0.01", "max_duration=8ba")
    uploads = [c["path_in_repo"] for c in calls(fake_hub, "upload_file")]
    assert uploads.count("checkpoints/ep0-ba4-rank0.pt") == 3 and uploads.count("checkpoints/ep0-ba8-rank0.pt") == 2
    assert "503 Client Error" in proc.stderr and "retrying in" in proc.stderr
    on_hub = hub_checkpoints(fake_hub, "me/flaky")
    assert {k: v for k, v in on_hub.items() if k.endswith(".pt")} == local_checkpoints(tmp_path / "ckpt" / "flaky")


@pytest.mark.train
def test_a_permanent_failure_stops_the_run_keeps_the_checkpoint_and_uploads_it_later(fake_hub, tmp_path, shards):
    script_failures(fake_hub, {"method": "upload_file", "status": 403, "times": 100, "match": "ep0-ba4-",
                               "message": "403 Forbidden: you cannot write to me/denied"})
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    local = tmp_path / "ckpt" / "denied"
    proc = train(config, "run_name=denied", "hub.repo=me/denied", "hub.retry_wait=0.01", check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"slm train: error: upload of checkpoints/ep0-ba4-rank0.pt to the Hub repo me/denied failed: "
                      f"403 Forbidden: you cannot write to me/denied; the checkpoints stay in {local}: fix the "
                      "cause and run again with the same run_name to resume (missing uploads are retried at start)"]
    assert "Traceback" not in proc.stderr
    assert is_complete(local / "ep0-ba4-rank0.pt")
    assert len([c for c in calls(fake_hub, "upload_file") if "ba4" in c["path_in_repo"]]) == 1  # 403: no retry

    script_failures(fake_hub)
    proc = train(config, "run_name=denied", "hub.repo=me/denied", "max_duration=8ba")
    assert resumed_at(proc) == 4
    on_hub = hub_checkpoints(fake_hub, "me/denied")
    assert {k: v for k, v in on_hub.items() if k.endswith(".pt")} == local_checkpoints(local)


@pytest.mark.train
def test_hub_export_puts_each_checkpoint_on_a_branch_named_after_it(fake_hub, tmp_path, shards):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = write_yaml(tmp_path / "tiny.yaml", shards)
    train(config, "run_name=exp", "hub.repo=me/exp", "hub.export=true", "max_duration=8ba")
    branches = sorted(p.name for p in fake_hub.repo_dir("me/exp").parent.iterdir() if p.is_dir())
    assert branches == ["ba1", "ba2", "ba4", "ba8", "main"]
    branch = fake_hub.repo_dir("me/exp", revision="ba4")  # what from_pretrained(repo, revision="ba4") fetches
    assert not (branch / "checkpoints").exists()
    model = AutoModelForCausalLM.from_pretrained(branch)
    assert AutoTokenizer.from_pretrained(branch)("Once upon a time")["input_ids"]
    saved = torch.load(tmp_path / "ckpt" / "exp" / "ep0-ba4-rank0.pt", weights_only=False)["state"]["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[f"model.{key}"]), key
    run = json.loads((branch / "slm-run.json").read_text())
    assert run["timestamp"]["batch"] == 4 and run["config"]["hub"]["repo"] == "me/exp"


@pytest.mark.train
def test_shards_uploaded_to_hf_stream_back_into_training(fake_hub, reference, tmp_path, corpus, tokenizer_dir,
                                                         shards):
    run_slm("tokenize", "-i", str(corpus), "-f", "story", "-s", "train[:90%]", "-t", str(tokenizer_dir), "-l", "64",
            "--out-remote", "hf://datasets/me/stories/train")
    uploaded = fake_hub.repo_dir("me/stories", "dataset") / "train"
    names = sorted(p.name for p in uploaded.iterdir())
    assert names == ["index.json", "shard.00000.mds.zstd", "slm-dataset.json"]
    for name in names:  # (the local folder also holds shards Streaming decompressed while training)
        assert (uploaded / name).read_bytes() == (shards / "train" / name).read_bytes(), name
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    train(config, "run_name=streamed", "data.train.remote=hf://datasets/me/stories/train",
          f"data.train.local={tmp_path / 'cache'}")
    assert any(c["filename"].startswith("train/shard.") for c in calls(fake_hub, "hf_hub_download"))
    assert_bitwise_equal(final_state(reference), final_state(tmp_path / "ckpt" / "streamed"))


@pytest.mark.train
def test_the_token_is_never_written_anywhere(fake_hub, tmp_path, shards, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    script_failures(fake_hub, {"method": "upload_file", "status": 403, "times": 1, "match": "ep0-ba2-",
                               "message": f"403 Forbidden: token {TOKEN} cannot write to me/secret"})
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    args = ["run_name=secret", "hub.repo=me/secret", "max_duration=8ba", "logging.wandb.project=slm-test"]
    failed = train(config, *args, check=False)
    assert failed.returncode == 1 and "403 Forbidden: token *** cannot write" in failed.stderr
    done = train(config, *args)
    assert resumed_at(done) == 2  # the checkpoint whose upload failed was kept
    for proc in (failed, done):
        assert TOKEN not in proc.stdout + proc.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written) and any(p.name == "run.json" for p in written)
    leaks = [str(p) for p in written if TOKEN.encode() in p.read_bytes() and p.name not in ("failures.json",)]
    assert leaks == []
