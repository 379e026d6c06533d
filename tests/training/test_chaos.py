"""A small run of bench/chaos.py: four SIGKILLs (at start, inside a checkpoint write, inside an evaluation,
at a random time), a restart after each, and the end equal tensor for tensor to an uninterrupted run; then two
double Ctrl-Cs over another run, each leaving every checkpoint whole, and its end equal too."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import run_cmd

pytestmark = pytest.mark.train


def test_chaos_kills_then_bitwise_equal_end(tmp_path):
    out = tmp_path / "chaos.json"
    proc = run_cmd([sys.executable, "bench/chaos.py", "--kills", "4", "--ctrl-c", "2", "--docs", "600",
                           "--json", str(out),
                           "max_duration=40ba", "save_interval=8ba", "eval_interval=10ba", "early_checkpoints=4"],
                   timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["bitwise_equal"] and result["survived"] and result["corrupt"] == []
    assert result["left_running"] == []
    records = result["records"]
    assert [r["moment"] for r in records] == ["start", "checkpoint", "eval", "random"][: len(records)]
    assert len(records) >= 3  # the random one may come after the run has finished
    for r in records:  # each start resumed from the newest complete checkpoint: lost only what came after it
        assert r["resumed_at"] in (None, r["complete_before"]) and r["lost"] == r["reached"] - r["newest_complete"]
    assert result["final_resumed_at"] == records[-1]["newest_complete"]
    assert "final weights and optimizer state equal to the uninterrupted run, tensor for tensor: True" in proc.stdout

    ctrl_c = result["ctrl_c"]
    assert ctrl_c["bitwise_equal"] and ctrl_c["final_exit"] == 0
    assert [r["second"] for r in ctrl_c["records"]] == ["at once", "inside the stop's checkpoint write"]
    for r in ctrl_c["records"]:
        assert r["exit"] == 130 and r["torn"] == [] and r["left_running"] == []
        assert r["resumed_at"] in (None, r["complete_before"])
