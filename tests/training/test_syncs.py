"""Host syncs: a training batch that logs nothing makes the host wait for the device nowhere in slm's code, and
Composer's own per-batch syncs are the few slm cannot remove (bench/RESULTS.md lists them)."""

from __future__ import annotations

import pytest
import torch

from slm.core import composer_workarounds, streaming_workarounds
from slm.core.config import load_config
from slm.training.trainer import same_numerics_in_any_process, start_run

from helpers import from_bench, write_yaml

instrument = from_bench("syncs")  # bench/syncs.py
ByBatch, HostSyncs = instrument.ByBatch, instrument.HostSyncs

# What Composer 0.32.1 syncs in every training batch of one process, with slm's workarounds: the data loader's end,
# the batch size, the loss (.cpu() and .item()) and SpeedMonitor's FLOPs; 12 without single_process_collectives.
COMPOSER_PER_BATCH = 6


def test_the_counter_sees_each_kind_of_sync_and_whose_it_is():
    x = torch.arange(6.0)
    with HostSyncs() as syncs:
        syncs.key = "calls"
        x.sum().item(), bool(x.max() > 1), float(x[0]), x.tolist(), x[x > 2], x.nonzero()
        syncs.key = "no syncs"
        (x * 2).sum(), x[1:3], x[torch.tensor([0, 2])], x.clamp(min=1)
    assert [s.call for s in syncs.calls["calls"]] == ["item", "__bool__", "__float__", "tolist", "__getitem__",
                                                      "nonzero"]
    assert "no syncs" not in syncs.calls
    assert {s.where.split(":")[0] for s in syncs.calls["calls"]} == {"test_syncs.py"}


@pytest.mark.train
@pytest.mark.beside
def test_batches_that_log_nothing_make_no_host_sync_in_slm(tmp_path, shards):
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    cfg = load_config([str(config)], ["run_name=syncs", "max_duration=12ba", "log_interval=4ba", "save_interval=6ba",
                                      "early_checkpoints=0", "eval_interval=0ba"])
    with (composer_workarounds.applied(), streaming_workarounds.applied(), same_numerics_in_any_process(),
          HostSyncs() as syncs):
        trainer = start_run(cfg).trainer
        trainer.state.callbacks.insert(0, ByBatch(syncs))
        trainer.fit()
        trainer.close()
    logging, saving = {4, 8, 12}, {6, 12}
    quiet = [b for b in range(1, 13) if b not in logging | saving]
    found = {b: syncs.summary([b], "slm") for b in quiet if syncs.count(b, "slm")}
    assert not found, f"slm synced in batches that log nothing: {found}"
    per_log = {b: syncs.count(b, "slm") for b in logging - saving}
    assert len(set(per_log.values())) == 1 and max(per_log.values()) <= 8, per_log  # the logged values, once each
    composer = {b: syncs.count(b, "composer") for b in quiet}
    assert max(composer.values()) <= COMPOSER_PER_BATCH, syncs.summary(quiet, "composer")
