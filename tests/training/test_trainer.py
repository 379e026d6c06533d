"""Training through the real Composer Trainer in real processes: reproducibility and exact resumption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch
from clusters import wait_until

from slm.core.run_folder import read_metrics

from helpers import (
    Started,
    assert_bitwise_equal,
    final_state,
    mds_tokens,
    newest_loadable,
    resumed_at,
    run_cmd,
    train,
    train_cmd,
    write_yaml,
)

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    """One uninterrupted 16-batch run, shared by the tests that compare against it."""
    root = tmp_path_factory.mktemp("reference")
    config = write_yaml(root / "tiny.yaml", shards)
    train(config, "run_name=ref")
    return config, root / "ckpt" / "ref"


def test_same_seed_gives_bitwise_identical_checkpoints(reference, tmp_path, shards):
    config, ref = reference
    other = write_yaml(tmp_path / "tiny.yaml", shards)
    train(other, "run_name=again")
    assert_bitwise_equal(final_state(ref), final_state(tmp_path / "ckpt" / "again"))
    train(other, "run_name=seed7", "seed=7")  # the comparison can fail: another seed gives other weights
    with pytest.raises(AssertionError, match="differs"):
        assert_bitwise_equal(final_state(ref), final_state(tmp_path / "ckpt" / "seed7"))


def test_profile_writes_a_trace_of_the_training_events_and_changes_no_bit(reference):
    """`profile: {batches: 3, skip_first: 2}`: Composer's profiler records batches 4 to 6 (2 skipped, 1 unrecorded)
    into the run folder's profile/, a Chrome/Perfetto trace naming the data loader, forward, backward and batch
    events; the run ends bitwise equal to the unprofiled reference."""
    config, ref = reference
    train(config, "run_name=profiled", "profile.batches=3", "profile.skip_first=2")
    folder = ref.parent / "profiled"  # the reference yaml's save folder: ckpt/{run_name} beside it
    assert sorted(p.name for p in (folder / "profile").iterdir()) == ["ep0-ba6-rank0.json", "merged_trace.json"]
    trace = json.loads((folder / "profile" / "merged_trace.json").read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e.get("name") for e in events if isinstance(e, dict)}
    assert {"event/dataloader", "event/forward", "event/backward", "event/batch"} <= names, sorted(names)[:50]
    assert_bitwise_equal(final_state(ref), final_state(folder))


def test_what_the_process_did_before_a_run_changes_no_bit_of_it(tmp_path, shards, monkeypatch):
    """A notebook or a test session runs other things before a run in its process: here torch's threads set and put
    back (which turns MKL's dynamic threading off) and another default dtype. The run is bitwise the fresh script's.
    Two threads in both, whatever the session's OMP_NUM_THREADS (make test's is 1)."""
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    train(config, "run_name=script", own_process=True)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_num_threads(2)
    torch.set_default_dtype(torch.float64)
    try:
        train(config, "run_name=here")
        assert torch.get_default_dtype() == torch.float64  # the caller's again
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
    assert_bitwise_equal(final_state(tmp_path / "ckpt" / "script"), final_state(tmp_path / "ckpt" / "here"))


def test_checkpoint_schedule_and_keep(tmp_path, shards):
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    train(config, "run_name=keep", "save_interval=3ba", "early_checkpoints=4", "keep=2", "eval_interval=16ba")
    folder = tmp_path / "ckpt" / "keep"
    names = sorted(p.name for p in folder.glob("*.pt") if not p.is_symlink())
    # early 1 2 4 always stay; periodic 3 6 9 12 15 and the end-of-training 16: newest two kept
    assert names == sorted(f"ep0-ba{b}-rank0.pt" for b in (1, 2, 4, 15, 16))
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba16-rank0.pt"
    assert (folder / "config.yaml").read_text().count("run_name: keep") == 1


@pytest.mark.stack
def test_sigkill_at_any_moment_then_resume_is_bitwise_equal(reference, tmp_path, shards):
    config, ref = reference
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    folder = tmp_path / "ckpt" / "victim"
    cmd = train_cmd(config, "run_name=victim")
    kill_when = [
        lambda: time.sleep(1.0) or True,  # during start-up, before any checkpoint
        lambda: (folder / "ep0-ba4-rank0.pt").exists(),  # the instant a checkpoint file appears: mid-write
        lambda: (folder / "ep0-ba8-rank0.pt").exists() and (time.sleep(0.05) or True),  # in the eval at batch 8
        lambda: (folder / "ep0-ba12-rank0.pt").exists(),
    ]
    for moment in kill_when:
        proc = Started(cmd)
        try:
            wait_until(lambda: moment() or proc.poll() is not None, 120, "the moment to kill at", 0.005)  # noqa: B023
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    expected = newest_loadable(folder)
    last = run_cmd(cmd, check=True)
    assert resumed_at(last) == expected > 0  # the newest complete checkpoint, not scratch
    assert_bitwise_equal(final_state(ref), final_state(folder))
    rows, ref_rows = (read_metrics(f) for f in (folder, ref))
    assert [r["batch"] for r in rows] == list(range(1, 17))  # every step once, none lost or doubled
    assert [r["loss/train/total"] for r in rows] == [r["loss/train/total"] for r in ref_rows]
    assert [b for b, r in enumerate(rows, 1) if "metrics/eval/CrossEntropy" in r] == [8, 16]
    # Train metrics every log_interval (4ba), each over its window, the same after kills mid-window.
    assert train_metrics(rows) == train_metrics(ref_rows)
    assert list(train_metrics(rows)) == [4, 8, 12, 16]
    for batch, values in train_metrics(rows).items():
        window = [r["loss/train/total"] for r in rows[batch - 4:batch]]  # equal target counts per batch
        assert values["metrics/train/CrossEntropy"] == pytest.approx(sum(window) / 4, rel=1e-6)


def train_metrics(rows: list[dict]) -> dict[int, dict]:
    """batch -> the train metrics logged at it, for the rows that have them."""
    picked = {r["batch"]: {k: v for k, v in r.items() if k.startswith("metrics/train/")} for r in rows}
    return {batch: values for batch, values in picked.items() if values}


@pytest.mark.parametrize("torn", ["truncated file", "missing symlink"])
def test_resume_after_a_torn_checkpoint_write(reference, tmp_path, torn):
    """The two states a kill inside Composer's checkpoint write can leave behind, made exactly."""
    config, ref = reference
    folder = tmp_path / "ckpt" / "torn"
    shutil.copytree(ref, folder, symlinks=True)
    for batch in (12, 16):
        (folder / f"ep0-ba{batch}-rank0.pt").unlink()
    (folder / "latest-rank0.pt").unlink()  # Composer removes the symlink before re-creating it
    if torn == "truncated file":
        path = folder / "ep0-ba8-rank0.pt"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    proc = train(config, "run_name=torn", f"save_folder={folder}")
    assert resumed_at(proc) == (4 if torn == "truncated file" else 8)  # the newest complete checkpoint
    assert_bitwise_equal(final_state(ref), final_state(folder))


def test_a_relative_save_folder_through_a_symlink_resumes_and_says_so(tmp_path, shards):
    """make demo's case: save_folder relative to where training is started (here also reached through a symlink),
    while Composer resumes from an absolute path."""
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cmd = train_cmd(config, "run_name=rel", "max_duration=4ba", "save_folder=link/ckpt/{run_name}")
    for said in ("starting at batch 0 of 4ba", "resumed at batch 4 of 4ba; already finished"):
        proc = run_cmd(cmd, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"slm train: rel: {said}" in proc.stderr and "branched" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "real" / "ckpt" / "rel" / "ep0-ba4-rank0.pt").exists()


def test_two_processes_then_resume_on_one_keeps_the_sample_order(tmp_path, shards):
    """composer -n 2 for 8 batches, then 1 process to 16, against 1 process throughout.

    Same samples in the same order give weights equal up to float summation order (DDP averages
    two half-batch gradients); another data order moves them by orders of magnitude more.
    """
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    train(config, "run_name=two", "max_duration=8ba", "scheduler.horizon=16ba", procs=2)
    assert final_state(tmp_path / "ckpt" / "two")["timestamp"]["Timestamp"]["batch"] == 8
    assert resumed_at(train(config, "run_name=two", "max_duration=16ba")) == 8
    for name, extra in (("one", []), ("shuffled", ["data.shuffle_seed=7"])):
        train(config, f"run_name={name}", "max_duration=8ba", "scheduler.horizon=16ba", *extra)
        train(config, f"run_name={name}", "max_duration=16ba", *extra)

    def max_diff(a: str, b: str) -> float:
        ma, mb = (final_state(tmp_path / "ckpt" / r)["model"] for r in (a, b))
        return max((ma[k] - mb[k]).abs().max().item() for k in ma)

    assert max_diff("two", "one") < 1e-5
    assert max_diff("shuffled", "one") > 1e-3


@pytest.mark.stack
def test_mamba_killed_mid_run_resumes_bitwise(tmp_path, shards):
    config = write_yaml(tmp_path / "mamba.yaml", shards, base="demo-mamba.yaml")
    args = ("max_duration=6ba", "save_interval=3ba", "eval_interval=6ba")
    train(config, "run_name=m", *args)
    straight = final_state(tmp_path / "ckpt" / "m")
    folder = tmp_path / "ckpt" / "m2"
    cmd = train_cmd(config, "run_name=m2", *args)
    proc = Started(cmd)
    try:  # the instant the batch-3 checkpoint appears: mid-write, or just after
        wait_until(lambda: (folder / "ep0-ba3-rank0.pt").exists() or proc.poll() is not None, 120,
                   "the checkpoint of batch 3", 0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    expected = newest_loadable(folder)
    proc = train(config, "run_name=m2", *args)
    assert resumed_at(proc) == expected > 0
    assert_bitwise_equal(straight, final_state(folder))
    assert torch.isfinite(next(iter(straight["model"].values()))).all()


def test_a_100k_model_learns_the_corpus_well_below_unigram_entropy(tmp_path, tokenizer_dir):
    import numpy as np

    from slm.data.corpus import write_corpus
    from slm.training.model import build_hf_model, count_parameters

    from helpers import run_slm

    write_corpus(tmp_path / "stories.jsonl", 3000, seed=5)
    for name, split in (("train", "train[:95%]"), ("eval", "train[95%:]")):
        run_slm("tokenize", "-i", str(tmp_path / "stories.jsonl"), "-f", "story", "-s", split,
                "-t", str(tokenizer_dir), "-l", "64", "--out-dir", str(tmp_path / name))
    arch = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = write_yaml(tmp_path / "learn.yaml", tmp_path, **arch)
    train(config, "run_name=learn", "max_duration=150ba", "global_batch_size=16", "save_interval=150ba",
          "early_checkpoints=0", "eval_interval=150ba", "scheduler.warmup=15ba",
          f"data.train.local={tmp_path / 'train'}", f"data.eval.local={tmp_path / 'eval'}")

    def tokens(name: str) -> np.ndarray:
        return mds_tokens(tmp_path / name).astype(np.int64)

    counts = np.bincount(tokens("train")[:, 1:].ravel())
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())

    cfg_model = {"class": "llama", "vocab_size": 512, "num_hidden_layers": 1, "max_position_embeddings": 64, **arch}
    model = build_hf_model(cfg_model, 0)
    assert 90_000 < count_parameters(model) < 110_000
    state = final_state(tmp_path / "ckpt" / "learn")["model"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    with torch.no_grad():
        batch = torch.from_numpy(tokens("eval"))
        eval_loss = model(input_ids=batch, labels=batch).loss.item()
    print(f"eval loss {eval_loss:.3f} nats vs unigram entropy {unigram_entropy:.3f}")
    assert eval_loss < unigram_entropy - 1.5, (eval_loss, unigram_entropy)


def test_a_checkpoint_never_holds_a_batch_missing_from_metrics_jsonl(tmp_path, shards):
    """Composer runs plain callbacks before loggers: the row must be written before the saver runs."""
    from composer.core import Callback

    from slm.core.config import load_config
    from slm.training.trainer import start_run

    folder = tmp_path / "ckpt" / "order"
    seen = []

    class Spy(Callback):  # placed right after the CheckpointSaver: sees each checkpoint the moment it exists
        def batch_checkpoint(self, state, logger):
            batch = int(state.timestamp.batch)
            if (folder / f"ep0-ba{batch}-rank0.pt").exists():
                seen.append((batch, batch in [r["batch"] for r in read_metrics(folder)]))

    config = write_yaml(tmp_path / "tiny.yaml", shards)
    trainer = start_run(load_config(config, ["run_name=order", "max_duration=8ba"])).trainer
    callbacks = trainer.state.callbacks
    callbacks.insert(next(i for i, cb in enumerate(callbacks) if type(cb).__name__ == "CheckpointSaver") + 1, Spy())
    trainer.fit()
    trainer.close()
    assert seen == [(1, True), (2, True), (4, True), (8, True)]
