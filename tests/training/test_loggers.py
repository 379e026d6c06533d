"""Watching runs: W&B offline files, the progress bar after autoresume, run metadata, and `slm plot`."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import REPO, run_slm, shown_on_failure, train, train_cmd, write_yaml


def transaction_log(path: Path) -> Iterator[bytes]:
    """The records of a W&B transaction log (`run-*.wandb`), read here because wandb 0.19 dropped its reader: a
    7-byte `:W&B` header, then the leveldb log format (github.com/google/leveldb, doc/log_format.md) in 32 KiB
    blocks, each record a 7-byte header (crc32, length, FULL/FIRST/MIDDLE/LAST) and a piece of its data."""
    block, data = 32768, path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's trailer: too short for a header
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding: the rest of the block (or the file) is empty
            pos += block - pos % block
            continue
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            yield pieces
            pieces = b""


def wandb_records(run_dir: Path) -> dict:
    """The run id, config and history steps W&B wrote to an offline run folder."""
    from wandb.proto import wandb_internal_pb2

    found = {"id": None, "config": {}, "steps": [], "keys": set()}
    for data in transaction_log(next(run_dir.glob("run-*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            config = record.run.config if kind == "run" else record.config
            found["config"].update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                    for item in config.update})
        if kind == "run":
            found["id"] = record.run.run_id
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            found["steps"].append(items["_step"])
            found["keys"] |= set(items)
    return found


@pytest.mark.train
@pytest.mark.stack
def test_wandb_offline_run_continues_under_the_same_id(tmp_path, shards):
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    args = ["run_name=watched", "logging.wandb.project=slm-test", "logging.wandb.tags=[tiny,test]"]
    train(config, *args, "max_duration=8ba", "scheduler.horizon=16ba")  # a 16-batch schedule, stopped at 8
    train(config, *args)  # continues the finished run to 16 batches: a resume
    runs = sorted((tmp_path / "ckpt" / "watched" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    first, resumed = wandb_records(runs[0]), wandb_records(runs[1])
    assert first["id"] == resumed["id"] == "watched"
    assert first["config"]["run_name"] == "watched" and first["config"]["model"]["class"] == "llama"
    assert first["config"]["logging"]["wandb"]["tags"] == ["tiny", "test"]
    assert "loss/train/total" in first["keys"] and "metrics/eval/CrossEntropy" in resumed["keys"]
    # The resumed run goes on from batch 8, not from 0 (Composer logs a batch's lr under the next step).
    assert max(first["steps"]) == min(resumed["steps"]) == 8


def run_in_terminal(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd` with stderr on a pseudo-terminal (160 columns), as a person at a shell sees it."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, cwd=REPO)
    os.close(slave)
    chunks: list[bytes] = []
    shown_on_failure(cmd, lambda: b"".join(chunks).decode(errors="replace"))

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    code = proc.wait(timeout=600)
    reader.join(timeout=30)
    os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


@pytest.mark.train
def test_progress_bar_after_autoresume_starts_at_the_resumed_batch(tmp_path, shards):
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    train(config, "run_name=bar", "max_duration=8ba", "scheduler.horizon=16ba")  # not a terminal: no bar state
    code, screen = run_in_terminal(train_cmd(config, "run_name=bar", "max_duration=16ba"))
    assert code == 0, screen[-2000:]
    frames = re.findall(r"train +\d+%\|[^|]*\| *(\d+)/(\d+)", screen)
    assert frames, screen[-2000:]
    assert frames[0] == ("8", "16")  # the very first frame: the resumed position out of the total
    assert frames[-1] == ("16", "16")
    assert all(int(done) >= 8 for done, _ in frames)  # never a count from zero
    assert "Traceback" not in screen and "Warning" not in screen


@pytest.mark.train
def test_run_json_records_what_ran_where_and_each_start(tmp_path, shards):
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    train(config, "run_name=meta", "max_duration=8ba", "scheduler.horizon=16ba")
    train(config, "run_name=meta")
    run = json.loads((tmp_path / "ckpt" / "meta" / "run.json").read_text())
    assert run["config"]["max_duration"] == "16ba" and run["parameters"] > 0
    assert [start["batch"] for start in run["starts"]] == [0, 8]
    start = run["starts"][-1]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert start["git_commit"].removesuffix("-dirty") == commit.strip()
    assert start["versions"]["torch"] and start["versions"]["mosaicml"] == "0.32.1"
    assert start["hardware"]["cpu_count"] == os.cpu_count() and start["hardware"]["gpu_count"] == 0
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", start["time"])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, shards) -> list[Path]:
    root = tmp_path_factory.mktemp("suite")
    for name, hidden in (("small", 16), ("large", 64)):
        train(write_yaml(root / f"{name}.yaml", shards, hidden_size=hidden), f"run_name={name}")
    return [root / "ckpt" / "small", root / "ckpt" / "large"]


@pytest.mark.train
def test_plot_draws_a_png_of_several_runs(tmp_path, two_runs):
    from PIL import Image

    out = tmp_path / "plots" / "curves.png"
    proc = run_slm("plot", *map(str, two_runs), "--out", str(out))
    assert "plotted 2 run(s)" in proc.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 1000 and len(set(image.convert("L").getdata())) > 50


@pytest.mark.train
def test_plot_of_a_folder_that_is_no_run_is_one_clear_line(tmp_path, two_runs):
    (tmp_path / "old.png").write_bytes(b"keep me")
    proc = run_slm("plot", str(two_runs[0]), str(tmp_path), "--out", str(tmp_path / "old.png"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"slm plot: error: {tmp_path} has no metrics.jsonl: give the run folder of "
                                   "slm/train.py (its save_folder, e.g. checkpoints/RUN_NAME)")
    assert (tmp_path / "old.png").read_bytes() == b"keep me"


@pytest.mark.parametrize(("batch", "kept"), [(3, [1, 2, 3]), (9, [1, 2, 3, 4, 5]), (0, [])])
def test_a_resume_cuts_metrics_jsonl_after_its_batch_reading_back_from_the_end(tmp_path, batch, kept):
    from slm.training.loggers import cut_rows_after

    rows = [json.dumps({"batch": b, "loss": b / 10}) + "\n" for b in range(1, 6)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(rows) + '\n{"batch": 6, "lo')  # a blank line and a row torn by a kill
    cut_rows_after(path, batch)
    assert path.read_text() == "".join(rows[:len(kept)])
    assert [json.loads(line)["batch"] for line in path.read_text().splitlines()] == kept
