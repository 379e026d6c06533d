"""Learning dynamics per token (`slm dynamics`, slm/analysis/dynamics.py) on a run whose data plants a pattern: the word
"zebra" is followed by "yak" only from about batch 34 on, so "yak" after "zebra" is acquired at the first
checkpoint after it, and at none before."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import slm
from slm.core.errors import SlmError
from slm.data.shards import read_documents
from slm.data.tokenizer import load_tokenizer

from helpers import run_slm, train, write_yaml

pytestmark = pytest.mark.train
WORDS = "red blue green cat dog sun moon tree river stone bird fish hill road rain wind yak".split()
GLOBAL_BATCH = 8
BEFORE, AFTER = 550, 1020  # documents without and with the pattern: about 34 and 62 batches


def document(rng: random.Random, planted: bool) -> str:
    """30 words, every fourth "zebra": followed by "yak" when planted, else by any other word."""
    words = []
    for i in range(30):
        if i % 4 == 0:
            words.append("zebra")
        elif words and words[-1] == "zebra":
            words.append("yak" if planted else rng.choice(WORDS[:-1]))
        else:
            words.append(rng.choice(WORDS))
    return " ".join(words)


def write_split(path: Path, documents: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """A run over BEFORE documents without the pattern, then AFTER with it, in that order (no shuffle), at a
    constant learning rate, checkpoints every 16 batches: its folder, the eval shards (documents with the pattern)
    and the first batch that holds it."""
    root = tmp_path_factory.mktemp("planted")
    rng = random.Random(0)
    corpus = write_split(root / "train.jsonl", [document(rng, False) for _ in range(BEFORE)] +
                         [document(rng, True) for _ in range(AFTER)])
    held_out = write_split(root / "eval.jsonl", [document(rng, True) for _ in range(40)])
    run_slm("tokenizer", "-i", str(corpus), "-v", "512", "--out-dir", str(root / "tok"))
    for split, source in (("train", corpus), ("eval", held_out)):
        run_slm("tokenize", "-i", str(source), "-t", str(root / "tok"), "-l", "64", "--out-dir", str(root / split))
    record = read_documents(root / "train")
    first_planted = next(s for s in range(len(record.sample_document)) if max(record.of_sample(s)) >= BEFORE)
    boundary = first_planted // GLOBAL_BATCH + 1  # the first batch with the pattern (samples in order)
    config = write_yaml(root / "planted.yaml", root)
    train(config, "run_name=planted", "max_duration=96ba", "save_interval=16ba", "early_checkpoints=0",
          "data.shuffle=false", "eval_interval=1000ba", "scheduler.name=constant", "optimizer.lr=1e-2")
    return root / "ckpt" / "planted", root / "eval", boundary


def test_a_planted_pattern_is_acquired_at_the_first_checkpoint_after_it(planted, tmp_path):
    folder, data, boundary = planted
    assert 32 < boundary <= 38, boundary  # the pattern comes in after the checkpoint at batch 32, well before 48
    out, png = tmp_path / "dynamics.parquet", tmp_path / "dynamics.png"
    done = run_slm("dynamics", str(folder), "--data", str(data), "--out", str(out), "--margin", "0.5",
                   "--max-samples", "16", "--plot", str(png))
    assert "planted: " in done.stdout and png.stat().st_size > 10_000, done.stdout
    table = pq.read_table(out).to_pandas()
    meta = json.loads(pq.read_schema(out).metadata[b"slm.analysis.dynamics"])
    batches = [c["batch"] for c in meta["checkpoints"]]
    assert batches == [16, 32, 48, 64, 80, 96] and meta["margin"] == 0.5 and "age of acquisition" in meta["definition"]

    tokenizer = load_tokenizer(str(folder.parent.parent / "tok"))
    zebra, yak = (tokenizer(f" {w}").input_ids[-1] for w in ("zebra", "yak"))
    previous = {(r.sample, r.position): r.token_id for r in table.itertuples()}
    is_planted = [r.token_id == yak and previous.get((r.sample, r.position - 1)) == zebra for r in table.itertuples()]
    pattern = table[is_planted]
    assert len(pattern) > 50
    losses = np.stack(pattern["losses"].to_numpy())
    assert losses[:, -1].mean() < 0.5 < 2.0 < losses[:, 1].mean(), losses.mean(axis=0)  # learnt, and only then
    assert (pattern["acquired_batch"] == 48).mean() > 0.9, pattern["acquired_batch"].value_counts()
    assert (pattern["forgettings"] == 0).mean() > 0.9

    per_token = pq.read_table(tmp_path / "dynamics-tokens.parquet").to_pandas().set_index("token_id")
    assert per_token.loc[yak, "count"] == (table["token_id"] == yak).sum()

    dynamics = slm.open(folder)["planted"].dynamics(data, margin=0.5, max_samples=16)  # the API: the same figures
    assert np.array_equal(np.array(dynamics.acquired.ravel()), np.array(
        [batches.index(b) for b in table["acquired_batch"]]))


def test_log_probs_of_another_split_are_refused(planted, tmp_path):
    """`--logprobs` tables made from the train split, given with the eval split: one line, nothing written."""
    folder, data, _ = planted
    run_slm("logprobs", str(folder), "--data", str(data.parent / "train"), "--max-samples", "4", "--out-dir",
            str(tmp_path / "lp"))
    out = tmp_path / "dynamics.parquet"
    proc = run_slm("dynamics", str(folder), "--data", str(data), "--logprobs", str(tmp_path / "lp"),
                   "--max-samples", "4", "--out", str(out), check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"slm dynamics: error: the log-probs tables in {tmp_path / 'lp'} are not of {data}'s samples (another "
        "split?): give the split they were made from, or another --logprobs folder"), proc.stderr
    assert not out.exists()



def test_chunks_of_any_size_give_the_tables_of_one_pass(planted, tmp_path):
    """`--chunk-samples` 1 and 5 (16 samples: an uneven last chunk) write the tables of one chunk, to the bit, and
    those are the figures of one pass over the whole split as it was computed before chunks (bincount, np.median)."""
    folder, data, _ = planted
    tables = {}
    for chunk in (None, 1, 5):
        out = tmp_path / f"chunk-{chunk}" / "dynamics.parquet"
        run_slm("dynamics", str(folder), "--data", str(data), "--out", str(out), "--max-samples", "16",
                *(["--chunk-samples", str(chunk)] if chunk else []))
        tables[chunk] = pq.read_table(out), pq.read_table(out.with_name("dynamics-tokens.parquet"))
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no scratch left
    for chunk in (1, 5):
        assert tables[chunk][0].equals(tables[None][0]) and tables[chunk][1].equals(tables[None][1]), chunk

    dynamics = slm.open(folder)["planted"].dynamics(data, max_samples=16)
    assert dynamics.per_position().equals(tables[None][0])
    present, inverse, counts = np.unique(dynamics.token_ids.ravel(), return_inverse=True, return_counts=True)
    means = np.stack([np.bincount(inverse, weights=step.ravel()) / counts for step in dynamics.losses], axis=1)
    tokens = np.array([c["tokens"] for c in dynamics.checkpoints], dtype=float)
    order = np.argsort(inverse, kind="stable")
    groups = np.split(tokens[dynamics.acquired.ravel()][order], np.cumsum(counts)[:-1])
    per_token = tables[None][1].to_pandas()
    assert np.array_equal(per_token["token_id"], present) and np.array_equal(per_token["count"], counts)
    assert np.array_equal(np.stack(per_token["mean_losses"]), means.astype(np.float32))
    assert per_token["median_acquired_tokens"].tolist() == [float(np.median(g)) for g in groups]
    forgettings = np.bincount(inverse, weights=dynamics.forgettings.ravel()) / counts
    assert np.array_equal(per_token["mean_forgettings"], forgettings.astype(np.float32))


def test_a_split_too_big_for_memory_is_refused_by_the_api_and_written_in_chunks(planted, tmp_path, monkeypatch):
    """Past the memory bound, `Run.dynamics` says what to do; `Run.write_dynamics` writes it in chunks."""
    import slm.analysis.dynamics as module

    folder, data, _ = planted
    monkeypatch.setattr(module, "MEMORY_BOUND", 6 * 63 * module.BYTES_PER_LOSS * 3)  # 3 samples of 63 losses, 6 ckpts
    run = slm.open(folder)["planted"]
    with pytest.raises(SlmError, match=r"8 samples x 64 tokens x 6 checkpoints take more than .*: write the tables "
                                       r"in chunks instead"):
        run.dynamics(data, max_samples=8)
    totals = run.write_dynamics(data, tmp_path / "d.parquet", max_samples=8)
    assert totals.positions == 8 * 63 == pq.read_table(tmp_path / "d.parquet").num_rows
