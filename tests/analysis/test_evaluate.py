"""Studying a suite: every checkpoint evaluated into one table, the scaling plot drawn from it, each run's status."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from streaming import StreamingDataset

from slm.analysis.evaluate import evaluate
from slm.analysis.plot import power_law
from slm.cli import main

from helpers import train, write_yaml

pytestmark = [pytest.mark.train, pytest.mark.beside]


@pytest.fixture(scope="module")
def suite(tmp_path_factory, shards):
    """Two finished 8-batch runs of two sizes."""
    root = tmp_path_factory.mktemp("suite")
    for name, hidden in (("small", 16), ("large", 48)):
        train(write_yaml(root / f"{name}.yaml", shards, hidden_size=hidden), f"run_name={name}", "max_duration=8ba")
    return root


def test_eval_of_run_folders_is_a_table_of_every_checkpoint_equal_to_each_evaluated_alone(suite, shards, capsys,
                                                                                          monkeypatch):
    out = suite / "evals.parquet"
    data = shards / "eval"
    runs = [str(suite / "ckpt" / name) for name in ("small", "large")]
    reads = []
    read_sample = StreamingDataset.__getitem__
    monkeypatch.setattr(StreamingDataset, "__getitem__", lambda self, i: reads.append(i) or read_sample(self, i))
    assert main(["eval", *runs, "--data", str(data), "--out", str(out), "--max-batches", "2"]) == 0
    assert reads == list(range(32))  # the split read once, for all 8 checkpoints
    monkeypatch.undo()
    assert "evaluated 8 checkpoint(s)" in capsys.readouterr().out
    rows = pq.read_table(out).to_pylist()
    assert {(r["run"], r["batch"]) for r in rows} == {(run, b) for run in ("small", "large") for b in (1, 2, 4, 8)}
    for row in rows:
        assert row["tokens"] == row["batch"] * 8 * 64 and row["architecture"] == "llama" and row["samples"] == 32
    checkpoint = suite / "ckpt" / "large" / "ep0-ba4-rank0.pt"
    alone = evaluate(checkpoint, data, max_batches=2)
    got = {r["metric"]: r["value"] for r in rows if (r["run"], r["batch"]) == ("large", 4)}
    assert got == {k: v for k, v in alone.items() if k not in ("model", "data", "samples")}
    params = {r["run"]: r["parameters"] for r in rows}
    assert params["large"] > params["small"] == json.loads((suite / "ckpt" / "small" / "run.json").read_text())[
        "parameters"]

    before = out.read_bytes()  # a second call finds every checkpoint in the table
    assert main(["eval", *runs, "--data", str(data), "--out", str(out), "--max-batches", "2"]) == 0
    assert "evaluated 0 checkpoint(s) into" in capsys.readouterr().out and out.read_bytes() == before
    assert main(["eval", runs[0], "--data", str(data), "--out", str(suite / "ba8.csv"), "--checkpoints", "ba8",
                 "--max-batches", "2"]) == 0
    assert (suite / "ba8.csv").read_text().count("\n") == 1 + 4  # the header, one row per metric

    assert main(["plot", "--table", str(out), "--out", str(suite / "scaling.png")]) == 0
    assert (suite / "scaling.png").stat().st_size > 10_000


def test_the_power_law_fit_recovers_its_exponent():
    params = [5e4, 1e5, 1e6, 1e7]
    a, b = power_law(params, [3.0 * n**-0.07 for n in params])
    assert a == pytest.approx(3.0) and b == pytest.approx(-0.07)


def test_status_says_which_run_finished_and_which_never_started(suite, tmp_path, capsys):
    never = write_yaml(tmp_path / "never.yaml", suite)  # its run folder does not exist
    assert main(["status", str(suite / "ckpt" / "small"), str(never), "--json"]) == 0
    small, unstarted = json.loads(capsys.readouterr().out)
    assert (small["state"], small["batch"], small["max_duration"], small["checkpoint"]) == \
        ("finished", 8, "8ba", "ep0-ba8-rank0.pt")
    assert small["tokens"] == 8 * 8 * 64 and small["eval_loss"] is not None and small["hub_pending"] == 0
    assert (unstarted["run"], unstarted["state"], unstarted["batch"]) == ("never", "not started", None)
    assert main(["status", str(suite / "ckpt" / "small")]) == 0
    assert "small" in capsys.readouterr().out.splitlines()[1]
