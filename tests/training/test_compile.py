"""`compile: true`: the forward, the loss inside it and their backward run as compiled graphs, built once in the first
batch (and said so), not again for evaluation; the losses are the eager run's within float tolerance."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import train, write_yaml

pytestmark = [pytest.mark.train, pytest.mark.beside]  # make test: in the second session


def losses(folder) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {row["batch"]: row["loss/train/total"] for row in rows if "loss/train/total" in row}


def test_compile_builds_the_graphs_once_and_trains_as_eager_does(tmp_path, shards, monkeypatch):
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    overrides = ["max_duration=6ba", "eval_interval=3ba", "save_interval=3ba", "early_checkpoints=0"]
    train(config, "run_name=eager", *overrides)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # evaluation or a batch must not recompile
    proc = train(config, "run_name=compiled", "compile=true", *overrides)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, dict(torch._dynamo.utils.counters)
    assert proc.stderr.count("slm train: compiled the model's forward, loss and backward") == 1, proc.stderr[-2000:]
    eager, compiled = losses(tmp_path / "ckpt" / "eager"), losses(tmp_path / "ckpt" / "compiled")
    assert sorted(eager) == sorted(compiled) == list(range(1, 7))
    for batch, loss in eager.items():
        assert compiled[batch] == pytest.approx(loss, rel=1e-4), (batch, loss, compiled[batch])
