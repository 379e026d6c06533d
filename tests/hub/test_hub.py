"""The Hub is unreachable here: the folder-backed HfApi double (tests/hub_double) stands in for it,
in this process and in the training subprocesses. Everything on our side of `HfApi` is real."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from slm.cli import main
from slm.core.run_folder import is_complete
from slm.core.trust import unpickle_checkpoint

from helpers import Started, assert_bitwise_equal, final_state, resumed_at, run_slm, train, train_cmd, write_yaml

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


@pytest.mark.stack
@pytest.mark.parametrize("local", [True, False])
def test_tokenizer_out_repo_pushes_the_saved_folder(fake_hub, tmp_path, corpus, local):
    out = ["--out-dir", str(tmp_path / "tok")] if local else []
    assert main(["tokenizer", "-i", str(corpus), "-f", "story", "-v", "300", "--out-repo", "me/tok", *out]) == 0
    repo = fake_hub.repo_dir("me/tok")
    assert (repo.parent / "private").read_text() == "True"
    assert (repo / "tokenizer.json").is_file()
    if local:
        assert (repo / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()


@pytest.mark.stack
def test_refused_upload_is_one_clear_line(fake_hub, corpus, capsys):
    script_failures(fake_hub, {"method": "create_repo", "status": 401, "times": 1,
                               "message": "401 Client Error: Unauthorized for url: https://huggingface.co/api/repos"})
    code = main(["tokenizer", "-i", str(corpus), "-f", "story", "-v", "300", "--out-repo", "me/tok"])
    err = capsys.readouterr().err
    assert code == 1
    assert "slm tokenizer: error: creating the Hub repo me/tok failed: 401 Client Error: Unauthorized" in err
    assert len(calls(fake_hub, "create_repo")) == 1  # a 401 is not retried


@pytest.mark.stack
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
    assert resumed_at(proc) == 8 and "hubrun: resumed at batch 8 of 16ba" in proc.stderr
    assert_bitwise_equal(final_state(reference), final_state(local))
    assert {"ep0-ba12-rank0.pt", "ep0-ba16-rank0.pt"} <= set(hub_checkpoints(fake_hub, "me/tiny"))


def commits_with(api, name: str) -> list[dict]:
    """The commit attempts (create_commit calls) whose files include `name`."""
    return [c for c in calls(api, "create_commit") if name in c["paths"]]


@pytest.mark.stack
@pytest.mark.train
def test_transient_errors_are_retried_with_backoff(fake_hub, tmp_path, shards):
    script_failures(fake_hub, {"method": "create_commit", "status": 503, "times": 2, "match": "ep0-ba4-"},
                    {"method": "create_commit", "status": "connection", "times": 1, "match": "ep0-ba8-"})
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    proc = train(config, "run_name=flaky", "hub.repo=me/flaky", "hub.retry_wait=0.01", "max_duration=8ba")
    assert len(commits_with(fake_hub, "ep0-ba4-")) == 3 and len(commits_with(fake_hub, "ep0-ba8-")) == 2
    assert "503 Client Error" in proc.stderr and "retrying in" in proc.stderr
    on_hub = hub_checkpoints(fake_hub, "me/flaky")
    assert {k: v for k, v in on_hub.items() if k.endswith(".pt")} == local_checkpoints(tmp_path / "ckpt" / "flaky")


@pytest.mark.stack
@pytest.mark.train
def test_a_permanent_failure_stops_the_run_keeps_the_checkpoint_and_uploads_it_later(fake_hub, tmp_path, shards):
    script_failures(fake_hub, {"method": "create_commit", "status": 403, "times": 100, "match": "ep0-ba4-",
                               "message": "403 Forbidden: you cannot write to me/denied"})
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    local = tmp_path / "ckpt" / "denied"
    proc = train(config, "run_name=denied", "hub.repo=me/denied", "hub.retry_wait=0.01", check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"slm train: error: commit of checkpoints/ep0-ba4-rank0.pt (and 5 more files) to the Hub "
                      f"repo me/denied failed: 403 Forbidden: you cannot write to me/denied; the checkpoints stay in "
                      f"{local}: fix the cause and run again with the same run_name to resume (missing uploads are "
                      "retried at start)"]
    assert "Traceback" not in proc.stderr
    assert is_complete(local / "ep0-ba4-rank0.pt")
    assert len(commits_with(fake_hub, "ep0-ba4-")) == 1  # 403: no retry
    assert "ep0-ba4-rank0.pt" not in hub_checkpoints(fake_hub, "me/denied")
    stopped_at = max(int(p.name.split("-ba")[1].split("-")[0]) for p in local.glob("ep*-ba*-rank0.pt"))
    assert stopped_at < 16  # the run stopped early, at the first batch after the upload thread failed

    script_failures(fake_hub)
    proc = train(config, "run_name=denied", "hub.repo=me/denied", "max_duration=16ba")
    assert resumed_at(proc) == stopped_at
    on_hub = hub_checkpoints(fake_hub, "me/denied")
    assert {k: v for k, v in on_hub.items() if k.endswith(".pt")} == local_checkpoints(local)


@pytest.mark.stack
@pytest.mark.train
def test_hub_export_puts_each_checkpoint_on_a_branch_named_after_it(fake_hub, tmp_path, shards):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = write_yaml(tmp_path / "tiny.yaml", shards)
    train(config, "run_name=exp", "hub.repo=me/exp", "max_duration=8ba")  # hub.export is on by default
    branches = sorted(p.name for p in fake_hub.repo_dir("me/exp").parent.iterdir() if p.is_dir())
    assert branches == ["ba1", "ba2", "ba4", "ba8", "main"]
    branch = fake_hub.repo_dir("me/exp", revision="ba4")  # what from_pretrained(repo, revision="ba4") fetches
    files = sorted(p.relative_to(branch).as_posix() for p in branch.rglob("*") if p.is_file())
    assert "model.safetensors" in files and "tokenizer.json" in files and ".gitattributes" in files
    assert not [f for f in files if f.startswith("checkpoints/") or f in ("metrics.jsonl", "run.json")]
    model = AutoModelForCausalLM.from_pretrained(branch)
    assert AutoTokenizer.from_pretrained(branch)("Once upon a time")["input_ids"]
    saved = unpickle_checkpoint(tmp_path / "ckpt" / "exp" / "ep0-ba4-rank0.pt")["state"]["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[f"model.{key}"]), key
    run = json.loads((branch / "slm-run.json").read_text())
    assert run["timestamp"]["batch"] == 4 and run["config"]["hub"]["repo"] == "me/exp"


@pytest.mark.stack
@pytest.mark.train
def test_shards_uploaded_to_hf_stream_back_into_training(fake_hub, reference, tmp_path, corpus, tokenizer_dir,
                                                         shards):
    run_slm("tokenize", "-i", str(corpus), "-f", "story", "-s", "train[:90%]", "-t", str(tokenizer_dir), "-l", "64",
            "--out-remote", "hf://datasets/me/stories/train")
    uploaded = fake_hub.repo_dir("me/stories", "dataset") / "train"
    names = sorted(p.name for p in uploaded.iterdir())
    assert names == ["index.json", "shard.00000.mds.zstd", "slm-dataset.json", "slm-documents.npz"]
    for name in names:  # (the local folder also holds shards Streaming decompressed while training)
        assert (uploaded / name).read_bytes() == (shards / "train" / name).read_bytes(), name
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    # Streaming reads hf:// through huggingface_hub, which the double replaces only in a new process (sitecustomize)
    train(config, "run_name=streamed", "data.train.remote=hf://datasets/me/stories/train",
          f"data.train.local={tmp_path / 'cache'}", own_process=True)
    assert any(c["filename"].startswith("train/shard.") for c in calls(fake_hub, "hf_hub_download"))
    assert_bitwise_equal(final_state(reference), final_state(tmp_path / "ckpt" / "streamed"))


@pytest.mark.train
@pytest.mark.parametrize("source", ["HF_TOKEN", "huggingface-cli login"])
def test_the_token_is_never_written_anywhere(fake_hub, tmp_path, shards, monkeypatch, source):
    """The token in the environment, or in the login's token file (which huggingface_hub reads; slm reads it only
    to mask it): never in a message, a file of the run or the Hub."""
    if source == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    else:
        import huggingface_hub.constants

        (tmp_path / "hf-home").mkdir()
        (tmp_path / "hf-home" / "token").write_text(TOKEN)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
        monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))  # processes started from here
    script_failures(fake_hub, {"method": "create_commit", "status": 403, "times": 1, "match": "ep0-ba2-",
                               "message": f"403 Forbidden: token {TOKEN} cannot write to me/secret"})
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    args = ["run_name=secret", "hub.repo=me/secret", "max_duration=8ba", "logging.wandb.project=slm-test"]
    failed = train(config, *args, check=False)
    assert failed.returncode == 1 and "403 Forbidden: token *** cannot write" in failed.stderr
    done = train(config, *args)
    assert resumed_at(done) >= 2  # the checkpoint whose upload failed was kept
    assert "ep0-ba2-rank0.pt" in hub_checkpoints(fake_hub, "me/secret")
    for proc in (failed, done):
        assert TOKEN not in proc.stdout + proc.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written) and any(p.name == "run.json" for p in written)
    leaks = [str(p) for p in written if TOKEN.encode() in p.read_bytes() and p.name not in ("failures.json", "token")]
    assert leaks == []


def set_limits(api, **limits) -> None:
    """Make the double as strict as the real Hub, scaled down (see tests/hub_double/folder_hub.py)."""
    (api.root / "limits.json").write_text(json.dumps(limits))


def max_in_any_window(times: list[float], window: float) -> int:
    return max((sum(1 for u in times if t <= u < t + window) for t in times), default=0)


@pytest.mark.stack
def test_a_429_is_waited_out_as_the_hub_asks(fake_hub):
    from folder_hub import hub_error
    from huggingface_hub.errors import HfHubHTTPError

    from slm.hub.client import rate_limit_wait

    def error(status: int, message: str, retry_after=None) -> HfHubHTTPError:
        return hub_error(HfHubHTTPError, status, message, retry_after)

    def limited(retry_after=None, message="429 Client Error: Too Many Requests"):
        return error(429, message, retry_after)

    assert rate_limit_wait(limited(7), fallback=2) == 7
    assert rate_limit_wait(limited("Wed, 21 Oct 2099 07:28:00 GMT"), fallback=2) == 3600  # capped at the window
    hub_text = ("You have exceeded the rate limit for repository commits (128 per hour). You can retry this action "
                "in 43 minutes.")
    assert rate_limit_wait(limited(message=hub_text), fallback=2) == 43 * 60
    assert rate_limit_wait(limited(), fallback=2) == 2
    assert rate_limit_wait(error(503, "503 Server Error"), fallback=2) is None


@pytest.mark.stack
def test_a_dropped_connection_of_the_hubs_http_library_is_retried(fake_hub, caplog):
    """huggingface-hub 1.x and 2.x talk through httpx / httpx2, whose connection errors are no OSErrors."""
    from folder_hub import connection_error

    from slm.hub.client import Hub

    answers = [connection_error(), "done"]

    def flaky() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert Hub(retry_wait=0.01).call("upload", flaky) == "done"
    assert "upload: Connection aborted: RemoteDisconnected; retrying in" in caplog.text


@pytest.mark.train
@pytest.mark.beside  # waits on the double's latency and windows
def test_a_run_checkpointing_every_batch_stays_within_the_budget_and_gets_everything_up(fake_hub, tmp_path, shards):
    """The Hub allows 4 commits per 4 s here; slm's budget is 3 per 4 s; one 429 (Retry-After 1) is scripted."""
    set_limits(fake_hub, max_commits=4, window=4)
    script_failures(fake_hub, {"method": "create_commit", "status": 429, "retry_after": 1, "times": 1,
                               "message": "429 Client Error: Too Many Requests"})
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    local = tmp_path / "ckpt" / "budget"
    proc = train(config, "run_name=budget", "hub.repo=me/budget", "max_duration=6ba", "save_interval=1ba",
                 "hub.max_commits_per_hour=3", "hub.budget_window_s=4")
    assert "the Hub's rate limit (429): waiting 1 s" in proc.stderr
    assert "commit budget of 3 per 4 s for me/budget reached" in proc.stderr
    assert "waiting for the Hub: " in proc.stderr  # the queue drained before the run exited
    commits = fake_hub.commits()
    assert max_in_any_window([c["time"] for c in commits], 4) <= 3
    assert not (fake_hub.root / "refused.jsonl").exists()  # the Hub never had to refuse one
    on_hub = hub_checkpoints(fake_hub, "me/budget")
    assert {k: v for k, v in on_hub.items() if k.endswith(".pt")} == local_checkpoints(local)
    assert len(on_hub) == 7 and on_hub["latest-rank0.pt.symlink"] == b"checkpoints/ep0-ba6-rank0.pt"
    main = [c for c in commits if c["revision"] == "main"]
    assert len(main) < 6  # checkpoints that waited for the budget went up together
    assert all({"metrics.jsonl", "run.json", "config.yaml"} <= set(c["paths"]) for c in main)
    repo = fake_hub.repo_dir("me/budget")
    assert (repo / "metrics.jsonl").read_bytes() == (local / "metrics.jsonl").read_bytes()
    branches = {c["revision"] for c in commits} - {"main"}
    assert branches == {f"ba{b}" for b in range(1, 7)}
    assert not (local / ".hub-pending").exists()  # the upload queue is empty, and gone


@pytest.mark.train
@pytest.mark.beside  # waits on the double's latency and windows
def test_slow_uploads_do_not_slow_training(fake_hub, tmp_path, shards):
    """Each commit takes 2 s and 14 checkpoints go up, yet queueing them took the training thread less than one commit
    in all: it never waited on an upload. Measured by the run itself (what the Hub logger's hooks took of the training
    thread while training, said in its last line), not by comparing clocks of two runs, which failed on a loaded
    machine's noise."""
    config, slow = write_yaml(tmp_path / "tiny.yaml", shards), fake_hub
    set_limits(slow, latency=2)
    proc = Started(train_cmd(config, "run_name=slow", "hub.repo=me/slow", "max_duration=192ba", "save_interval=16ba",
                             "eval_interval=1000ba", "hub.export=false"))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    uploaded = [p for c in slow.commits() for p in c["paths"] if p.endswith("-rank0.pt")]
    assert sorted(uploaded) == sorted(f"checkpoints/{name}" for name in local_checkpoints(tmp_path / "ckpt" / "slow"))
    assert len(uploaded) == 14 and len(slow.commits()) >= 2  # 28 s of commits, at least
    spent = re.search(r"training spent ([\d.]+) s queueing 14 checkpoint\(s\) for me/slow; their uploads ran "
                      r"beside it", err)
    assert spent, err[-3000:]
    assert float(spent.group(1)) < 2, f"queueing took the training thread {spent.group(1)} s: it waited on a commit"


@pytest.mark.train
@pytest.mark.beside  # waits on the double's latency and windows
def test_a_kill_during_an_upload_loses_nothing(fake_hub, tmp_path, shards):
    set_limits(fake_hub, latency=3)
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    local = tmp_path / "ckpt" / "killed"
    args = ["run_name=killed", "hub.repo=me/killed"]
    proc = Started(train_cmd(config, *args))
    deadline = time.monotonic() + 120
    while not calls_file(fake_hub) or "create_commit" not in calls_file(fake_hub).read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(1)  # inside the 3 s the commit takes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert fake_hub.commits() == []  # it was killed before the Hub took the commit
    set_limits(fake_hub)
    train(config, *args)
    on_hub = hub_checkpoints(fake_hub, "me/killed")
    assert {k: v for k, v in on_hub.items() if k.endswith(".pt")} == local_checkpoints(local)
    assert set(local_checkpoints(local)) == {f"ep0-ba{b}-rank0.pt" for b in (1, 2, 4, 8, 12, 16)}
    assert {c["revision"] for c in fake_hub.commits()} == {"main", "ba1", "ba2", "ba4", "ba8", "ba12", "ba16"}


def calls_file(api) -> Path | None:
    path = api.root / "calls.jsonl"
    return path if path.exists() else None
