"""Data mixtures: `data.{train,eval}.streams`, several MDS folders weighted through Streaming's `Stream`.

The config rules; the fast reader against the stock one over a mixture; each stream's share of an
epoch; preflight naming the stream that does not fit; and, training, a kill and resume bitwise equal
to an uninterrupted run, and `-n 2` resumed on one process in the same sample order.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming import MDSWriter, Stream, StreamingDataset
from torch.utils.data import DataLoader

from slm.core.config import DataConfig, DataSplit, StreamConfig, load_config
from slm.core.errors import SlmError
from slm.core.run_folder import read_metrics
from slm.core.streaming_workarounds import streaming_datasets
from slm.data.loading import build_dataloader, collate, describe_split
from slm.data.mapped_shards import MappedShards

from helpers import (
    Started,
    assert_bitwise_equal,
    final_state,
    newest_loadable,
    resumed_at,
    run_cmd,
    train,
    train_cmd,
    write_yaml,
)

BATCH = 8


def mixture_yaml(path: Path, shards: Path, streams: dict[str, dict], **eval_streams: dict) -> Path:
    """conftest's tiny config (8 batches, checkpoints every 2) over `streams` (name -> Stream fields) for data.train,
    and data.eval over `eval_streams` when given."""
    base = write_yaml(path.with_name(f"{path.stem}-base.yaml"), shards)
    lines = [f"base: {base}", "max_duration: 8ba", "save_interval: 2ba", "early_checkpoints: 0", "eval_interval: 8ba",
             "scheduler: {warmup: 2ba}", "data:", "  train:", "    local: null", "    streams:"]
    lines += [f"      {name}: {json.dumps(fields)}" for name, fields in streams.items()]
    if eval_streams:
        lines += ["  eval:", "    local: null", "    streams:"]
        lines += [f"      {name}: {json.dumps(fields)}" for name, fields in eval_streams.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# Config rules: no data needed, the folders need not exist.

RULES = {
    "folder beside streams": (["data.train.local=/d/x"], "config key 'data.train.streams' replaces data.train.local "
                                                         "and data.train.remote: set them to null"),
    "stream without a folder": (["data.train.streams.new.proportion=1"], "config key 'data.train.streams.new.local' "
                                                                         "is not set"),
    "both weights": (["data.train.streams.web.repeat=2"], "config key 'data.train.streams.web' sets both proportion "
                                                          "and repeat: give one"),
    "proportion on some": (["data.train.streams.web.proportion=null"], "config key 'data.train.streams.web' has no "
                                                                       "proportion but 'data.train.streams.code' has "
                                                                       "one"),
    "zero proportion": (["data.train.streams.code.proportion=0"], "config key 'data.train.streams.code.proportion' "
                                                                  "must be positive, got 0.0"),
    "negative repeat": (["data.train.streams.web.proportion=null", "data.train.streams.code.proportion=null",
                         "data.train.streams.web.repeat=-1"], "config key 'data.train.streams.web.repeat' must be "
                                                              "positive, got -1.0"),
    "one folder twice": (["data.train.streams.code.local=/d/web/"], "config keys 'data.train.streams.web.local' and "
                                                                    "'data.train.streams.code.local' name one folder"),
    "eval streams checked too": (["data.eval.local=null", "data.eval.streams.x.proportion=1"],
                                 "config key 'data.eval.streams.x.local' is not set"),
    "no folder, no streams": (["data.eval.local=null"], "config key 'data.eval.local' is not set: give the folder"),
}


@pytest.mark.parametrize("name", list(RULES))
def test_config_rules(name, tmp_path):
    config = mixture_yaml(tmp_path / "mix.yaml", Path("/d"), {"web": {"local": "/d/web", "proportion": 0.7},
                                                          "code": {"local": "/d/code", "proportion": 0.3}})
    overrides, expected = RULES[name]
    with pytest.raises(SlmError) as e:
        load_config(config, overrides)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_config_accepts_mixtures(tmp_path):
    config = mixture_yaml(tmp_path / "mix.yaml", Path("/d"), {"web": {"local": "/d/web", "proportion": 0.7},
                                                          "code": {"local": "/d/code", "proportion": 0.3}})
    cfg = load_config(config)
    assert cfg.data.train.streams == {"web": StreamConfig("/d/web", proportion=0.7),
                                      "code": StreamConfig("/d/code", proportion=0.3)}
    repeat_on_some = ["data.train.streams.web.proportion=null", "data.train.streams.code.proportion=null",
                      "data.train.streams.code.repeat=2.5"]  # the others: each sample once an epoch
    assert load_config(config, repeat_on_some).data.train.streams["code"].repeat == 2.5
    assert describe_split(cfg.to_dict()["data"]["train"]) == "web (0.7): /d/web, code (0.3): /d/code"
    assert describe_split({"local": "/d/x", "remote": None}) == "/d/x"  # a run.json from before streams
    assert describe_split({"local": "c", "remote": None, "streams": {"s": {"local": "c", "remote": "hf://x",
                                                                             "proportion": None, "repeat": 2.0}}}
                          ) == "s (repeat 2): hf://x"


# The reader over a mixture: synthetic streams of many small shards, each sample's first token its stream's id.

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    for stream_id, (name, samples) in enumerate((("a", 503), ("b", 211)), 1):
        rng = np.random.default_rng(stream_id)
        with MDSWriter(out=str(root / name), columns={"tokens": "ndarray:uint16:16"}, compression="zstd",
                       size_limit=2048) as writer:
            for _ in range(samples):
                tokens = rng.integers(3, 60000, 16, dtype=np.uint16)
                tokens[0] = stream_id
                writer.write({"tokens": tokens})
    return root


def read(cls: type[StreamingDataset], root: Path, weights: dict[str, dict]) -> list[torch.Tensor]:
    """Streams a and b weighted by `weights` (name -> Stream's proportion or repeat): epoch 1 whole, then epoch 2
    stopped after 5 batches, saved, and resumed in a new dataset; all the batches."""

    def dataset() -> StreamingDataset:
        streams = [Stream(local=str(root / name), **weights.get(name, {})) for name in ("a", "b")]
        return cls(streams=streams, batch_size=BATCH, shuffle=True, shuffle_seed=7, num_canonical_nodes=1)

    def loader(ds: StreamingDataset) -> DataLoader:
        return DataLoader(ds, batch_size=BATCH, collate_fn=collate, drop_last=True)

    with streaming_datasets():  # prefixes registered as slm's readers do: a session beside this one reads too
        ds = dataset()
        batches = [b["input_ids"] for b in loader(ds)]
        if cls is MappedShards:  # its own read, not the stock fallback (which leaves an _iterator)
            assert not hasattr(ds, "_iterator")
        it = iter(loader(ds))
        batches += [next(it)["input_ids"] for _ in range(5)]
        state = ds.state_dict(num_samples=5 * BATCH, from_beginning=False)
        del it, ds
        gc.collect()  # Streaming frees its shared memory when the dataset goes
        resumed = dataset()
        resumed.load_state_dict(state)
        return batches + [b["input_ids"] for b in loader(resumed)]


WEIGHTS = {"proportion": {"a": {"proportion": 0.3}, "b": {"proportion": 0.7}},  # b drawn 2.4 times over
           "repeat": {"a": {"repeat": 0.5}, "b": {"repeat": 2.0}},
           "none": {}}


@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_same_samples_in_the_same_order_as_the_stock_reader(synthetic, weights):
    """Shard ids run on across the streams and each shard lives in its stream's folder: MappedShards reads a mixture
    bit for bit as Streaming's own reader does, over shuffled epochs, a mid-epoch resume and re-drawn samples."""
    fast, stock = (read(cls, synthetic, WEIGHTS[weights]) for cls in (MappedShards, StreamingDataset))
    assert len(fast) == len(stock) > 80
    assert all(torch.equal(a, b) for a, b in zip(fast, stock, strict=True))


def test_each_stream_gets_its_share_of_an_epoch(synthetic):
    """Through slm's own loader: an epoch keeps the streams' total size (714) and draws each its proportion, b's
    211 samples about 2.4 times; each batch mixes the streams. An eval split of streams draws the same samples
    at every evaluation."""
    streams = {"a": StreamConfig(str(synthetic / "a"), proportion=0.3),
               "b": StreamConfig(str(synthetic / "b"), proportion=0.7)}
    loader = build_dataloader(DataSplit(streams=streams), DataConfig(shuffle_seed=3), BATCH, train=True).dataloader
    epoch = torch.cat([b["input_ids"] for b in loader])
    assert len(epoch) == 714 // BATCH * BATCH
    from_b = (epoch[:, 0] == 2).float().mean().item()
    assert 0.68 < from_b < 0.72, from_b
    assert len(torch.unique(epoch[epoch[:, 0] == 2], dim=0)) == 211  # every sample of b, some twice or three times
    mixed = [(batch[:, 0] == 1).any() and (batch[:, 0] == 2).any() for batch in epoch.split(BATCH)]
    assert sum(mixed) > 0.8 * len(mixed)
    del loader
    gc.collect()

    evaluation = build_dataloader(DataSplit(streams=streams), DataConfig(), BATCH, train=False).dataloader
    first, second = ([b["input_ids"] for b in evaluation] for _ in range(2))  # two evaluations: two epochs
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert 0.68 < (torch.cat(first)[:, 0] == 2).float().mean().item() < 0.72
    del evaluation
    gc.collect()


# Preflight against the session's shards: a stream whose tokenizer or seq_len does not fit is named. slm-dataset.json
# is all preflight reads of a folder's make-up, so a copy of the eval folder with one field changed stands in for a
# folder tokenized otherwise.

@pytest.fixture
def mixed_data(tmp_path, shards) -> Path:
    shutil.copytree(shards / "eval", tmp_path / "code")
    return tmp_path


def edit_metadata(folder: Path, **fields) -> None:
    meta = json.loads((folder / "slm-dataset.json").read_text())
    for key, value in fields.items():
        if key == "content_hash":
            meta["tokenizer"]["content_hash"] = value
        else:
            meta[key] = value
    (folder / "slm-dataset.json").write_text(json.dumps(meta))


def test_preflight_takes_the_tokenizer_of_the_first_train_stream(mixed_data, shards):
    from slm.training.preflight import preflight

    config = mixture_yaml(mixed_data / "mix.yaml", shards, {"web": {"local": str(shards / "train"), "proportion": 0.5},
                                                            "code": {"local": str(mixed_data / "code"),
                                                                     "proportion": 0.5}})
    plan = preflight(load_config(config))
    recorded = json.loads((shards / "train" / "slm-dataset.json").read_text())["tokenizer"]
    assert plan.tokenizer_identity["name"] == recorded["name"]


PREFLIGHT = {
    "another tokenizer": ({"content_hash": "sha256:" + "0" * 64}, "data.train.streams.code was tokenized with {tok}, "
                                                                  "not with {tok} (content hashes differ)"),
    "another seq_len": ({"seq_len": 32}, "data.train.streams.web has seq_len 64 but data.train.streams.code has 32: "
                                         "train, eval and every stream need one seq_len"),
    "longer than the model's context": ({"seq_len": 128}, "data.train.streams.code has seq_len 128 but the model has "
                                                          "max_position_embeddings 64"),
    "no shards": ({"remove": True}, "data.train.streams.code.local = {code} holds no MDS shards"),
}


@pytest.mark.parametrize("name", list(PREFLIGHT))
def test_preflight_names_the_stream_that_does_not_fit(name, mixed_data, shards):
    from slm.training.preflight import preflight

    code = mixed_data / "code"
    fields, expected = PREFLIGHT[name]
    if fields.pop("remove", False):
        (code / "index.json").unlink()
    edit_metadata(code, **fields)
    config = mixture_yaml(mixed_data / "mix.yaml", shards, {"web": {"local": str(shards / "train"), "proportion": 0.5},
                                                            "code": {"local": str(code), "proportion": 0.5}})
    with pytest.raises(SlmError) as e:
        preflight(load_config(config))
    tok = json.loads((shards / "train" / "slm-dataset.json").read_text())["tokenizer"]["name"]  # the same name
    assert expected.format(code=code, tok=tok) in str(e.value)


# Training on a mixture: the session's train shards and a copy of its eval shards (163 samples, drawn 5 times over).

@pytest.fixture(scope="module")
def mixture(tmp_path_factory, shards) -> tuple[Path, Path]:
    """The config, and one uninterrupted 8-batch run of it."""
    root = tmp_path_factory.mktemp("mixture")
    shutil.copytree(shards / "eval", root / "code")
    config = mixture_yaml(root / "mix.yaml", shards, {"web": {"local": str(shards / "train"), "proportion": 0.5},
                                                      "code": {"local": str(root / "code"), "proportion": 0.5}})
    train(config, "run_name=ref")
    return config, root / "ckpt" / "ref"


@pytest.mark.train
def test_a_mixture_killed_mid_run_resumes_bitwise_equal(mixture, tmp_path):
    config, ref = mixture
    folder = tmp_path / "ckpt" / "victim"
    cmd = train_cmd(config, "run_name=victim", f"save_folder={folder}")
    proc = Started(cmd)
    try:
        deadline = time.monotonic() + 120
        while not (folder / "ep0-ba4-rank0.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the instant the checkpoint appears: mid-write
        proc.wait()
    expected = newest_loadable(folder)
    last = run_cmd(cmd, check=True)
    assert resumed_at(last) == expected > 0
    assert_bitwise_equal(final_state(ref), final_state(folder))
    rows, ref_rows = read_metrics(folder), read_metrics(ref)
    assert [r["batch"] for r in rows] == list(range(1, 9))
    assert [r["loss/train/total"] for r in rows] == [r["loss/train/total"] for r in ref_rows]
    recorded = json.loads((folder / "run.json").read_text())["config"]["data"]["train"]  # the model card's data row
    web = recorded["streams"]["web"]["local"]
    assert describe_split(recorded) == f"web (0.5): {web}, code (0.5): {config.parent}/code"


@pytest.mark.train
def test_two_processes_then_one_keep_the_mixture_order(mixture, tmp_path):
    """composer -n 2 to batch 4 (its later checkpoints removed), then 1 process to 8, against 1 process throughout.

    Same samples in the same order give weights equal up to float summation order (DDP averages two half-batch
    gradients), and the same loss on every batch; another order (data.shuffle_seed=7) gives losses up to 1e-2 apart
    (most above 1e-3) and weights 2e-2 apart.
    """
    config, ref = mixture
    folder = tmp_path / "ckpt" / "two"
    train(config, "run_name=two", f"save_folder={folder}", procs=2)
    for batch in (6, 8):
        (folder / f"ep0-ba{batch}-rank0.pt").unlink()
    (folder / "latest-rank0.pt").unlink()
    assert resumed_at(train(config, "run_name=two", f"save_folder={folder}")) == 4
    ours, theirs = final_state(folder)["model"], final_state(ref)["model"]
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-5
    losses = [r["loss/train/total"] for r in read_metrics(folder)]  # batches 1-4 on two processes, 5-8 on one
    assert losses == pytest.approx([r["loss/train/total"] for r in read_metrics(ref)], rel=1e-5)
    assert len(losses) == 8
