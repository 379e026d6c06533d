"""Learning-rate schedules through the real Trainer: the curves, and continuing a run keeps them continuous."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import assert_bitwise_equal, final_state, train_stderr, write_yaml

pytestmark = pytest.mark.train
LR, WARMUP = 3e-3, 2  # demo-llama's lr; write_yaml's configs warm up over 4ba, overridden here


def lrs(folder: Path) -> dict[int, float]:
    """metrics.jsonl's lr of the first parameter group, by batch."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {row["batch"]: row["lr-AdamW/group0"] for row in rows}


def expected(name: str, batch: int, end: int, alpha_f: float, decay_start: int | None = None) -> float:
    """The schedule as docs/design.md draws it; metrics.jsonl's row for batch b logs the lr set after it."""
    t = batch
    if t < WARMUP:
        return LR * t / WARMUP
    if name == "constant" or (name == "wsd" and t < decay_start):
        return LR
    start = WARMUP if name in ("cosine", "linear") else decay_start
    x = min((t - start) / (end - start), 1.0)
    shape = (1 + math.cos(math.pi * x)) / 2 if name == "cosine" else 1 - x
    return LR * (alpha_f + (1 - alpha_f) * shape)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_a_finished_run_continued_keeps_its_lr_curve(tmp_path, shards, name):
    """8 batches, then continued to 12: batches 1-8 as before, then the lr goes on from where it was."""
    config = str(write_yaml(tmp_path / "tiny.yaml", shards))
    run = [f"run_name={name}", f"scheduler.name={name}", f"scheduler.warmup={WARMUP}ba", "scheduler.alpha_f=0.1",
           "scheduler.decay=0.25", "log_interval=1ba", "eval_interval=100ba"]
    train_stderr(config, *run, "max_duration=8ba")
    folder = tmp_path / "ckpt" / name
    first = lrs(folder)
    assert f"slm train: {name}: resumed at batch 8 of 12ba" in train_stderr(config, *run, "max_duration=12ba")
    after = lrs(folder)
    assert sorted(after) == list(range(1, 13)) and all(after[b] == first[b] for b in first)
    # the 8-batch run's ends stay: cosine and linear decay over 8 batches, wsd's decay (batches 6-8) is done
    for batch, lr in after.items():
        assert lr == pytest.approx(expected(name, batch, 8, 0.1, decay_start=6), rel=1e-6), (batch, after)
    steps = [abs(after[b + 1] - after[b]) for b in range(WARMUP + 1, 12)]
    assert steps[8 - WARMUP - 1] <= max(steps[: 8 - WARMUP - 1]) + 1e-12  # no jump at the resume batch

    files = {p.name: p.read_bytes() for p in folder.glob("*.pt")}
    again = train_stderr(config, *run, "max_duration=12ba")  # a resubmitted job whose run is done
    assert "resumed at batch 12 of 12ba; already finished" in again
    assert {p.name: p.read_bytes() for p in folder.glob("*.pt")} == files


def test_wsd_resumed_in_its_stable_phase_with_more_batches_is_a_run_of_that_length(tmp_path, shards):
    """A 12-batch wsd run stopped at batch 8 (before its decay) and resumed with max_duration=16ba ends bitwise
    equal to a 16-batch run: the stable phase extends and the decay runs over the new end's last quarter."""
    config = str(write_yaml(tmp_path / "tiny.yaml", shards))
    run = ["scheduler.name=wsd", "scheduler.decay=0.25", "scheduler.decay_shape=sqrt", "log_interval=1ba",
           "eval_interval=100ba"]
    train_stderr(config, *run, "run_name=long", "max_duration=16ba")
    train_stderr(config, *run, "run_name=grown", "max_duration=12ba")
    folder = tmp_path / "ckpt" / "grown"
    for late in ("ep0-ba12-rank0.pt", "latest-rank0.pt"):  # as if killed at batch 10
        (folder / late).unlink()
    assert "grown: resumed at batch 8 of 16ba" in train_stderr(config, *run, "run_name=grown", "max_duration=16ba")
    assert lrs(folder) == lrs(tmp_path / "ckpt" / "long")
    assert_bitwise_equal(final_state(tmp_path / "ckpt" / "long"), final_state(folder))


def test_continuing_past_a_decay_to_zero_is_refused_and_changes_nothing(tmp_path, shards):
    config = str(write_yaml(tmp_path / "tiny.yaml", shards))
    train_stderr(config, "run_name=done", "max_duration=8ba", "eval_interval=100ba")  # cosine to 0
    folder = tmp_path / "ckpt" / "done"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    err = train_stderr(config, "run_name=done", "max_duration=12ba", "eval_interval=100ba", status=1)
    assert err.startswith(f"slm train: error: the cosine schedule of {folder} ended at batch 8 with lr 0"), err
    assert "load.path" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before

    err = train_stderr(config, "run_name=tokens", "max_duration=4096tok", status=1)  # a decay counts batches
    assert "max_duration = 4096tok is not in batches or epochs, which the lr schedules count" in err
