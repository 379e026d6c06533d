"""`slm batches` names, without training, exactly the samples training feeds: compared token for token with what
real runs consumed (tests/hooks puts a recording callback into their processes), and back to the documents."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from slm.cli import main

from helpers import run_cmd, train_cmd, write_yaml

pytestmark = [pytest.mark.train, pytest.mark.beside]
BATCH = 64


def recorded(folder: Path) -> dict[tuple[int, int], list]:
    """(step, rank) -> the batch's token ids, as training fetched them (the last fetch of a step re-run)."""
    batches = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        for line in path.read_text().splitlines():
            row = json.loads(line)
            batches[(row["step"], rank)] = row["tokens"]
    return batches


def predicted(target: Path, out: Path, steps: str, world_size: int = 1) -> dict[tuple[int, int], list]:
    """(step, rank) -> token ids of the samples `slm batches` names, in batch order."""
    assert main(["batches", str(target), "--steps", steps, "--world-size", str(world_size), "--tokens",
                 "--out", str(out)]) == 0
    table = pq.read_table(out).to_pylist()
    batches: dict[tuple[int, int], list] = {}
    for row in sorted(table, key=lambda r: (r["step"], r["rank"], r["position"])):
        batches.setdefault((row["step"], row["rank"]), []).append(row["tokens"])
    return batches


def recording_env(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "SLM_TEST_RECORD_BATCHES": str(folder)}


def run(config: Path, record: Path, *overrides: str, procs: int = 1) -> None:
    proc = run_cmd(train_cmd(config, *overrides, procs=procs), env=recording_env(record))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_batches_are_what_two_epochs_killed_and_resumed_trained_on(tmp_path, shards):
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    record = tmp_path / "record"
    steps_per_epoch = 1560 // BATCH  # the session's train split: 1560 samples
    total = steps_per_epoch + 8  # into the second epoch
    args = ["run_name=twice", f"global_batch_size={BATCH}", f"max_duration={total}ba", "save_interval=4ba",
            "eval_interval=1000ba"]
    run(config, record, *args)
    folder = tmp_path / "ckpt" / "twice"
    resume_at = steps_per_epoch + 4  # as if killed after batch resume_at + 2: the second epoch's middle
    for path in folder.glob("ep*-ba*-rank0.pt"):
        if int(path.name.split("-ba")[1].split("-")[0]) > resume_at:
            path.unlink()
    (folder / "latest-rank0.pt").unlink()
    rows = (record / "rank0.jsonl").read_text().splitlines()
    (record / "rank0.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= resume_at))
    run(config, record, *args)  # resumes at resume_at; records the rest again
    trained = recorded(record)
    assert sorted(trained) == [(s, 0) for s in range(1, total + 1)]
    assert predicted(folder, tmp_path / "b.parquet", f"1:{total}") == trained
    assert trained[(1, 0)] != trained[(steps_per_epoch + 1, 0)]  # the second epoch has its own order


def test_batches_are_what_each_rank_of_composer_n_2_trained_on_from_a_mixture(tmp_path, shards):
    base = write_yaml(tmp_path / "base.yaml", shards)
    config = tmp_path / "mix.yaml"
    config.write_text(f"base: {base}\nglobal_batch_size: {BATCH}\nmax_duration: 36ba\nsave_interval: 1000ba\n"
                      "eval_interval: 1000ba\nearly_checkpoints: 0\ndata:\n  train:\n    local: null\n    streams:\n"
                      f"      stories: {{local: {shards / 'train'}, proportion: 0.6}}\n"
                      f"      more: {{local: {shards / 'eval'}, proportion: 0.4}}\n")
    record = tmp_path / "record"
    run(config, record, "run_name=mix", procs=2)
    trained = recorded(record)
    assert sorted(trained) == [(s, r) for s in range(1, 37) for r in (0, 1)]
    assert predicted(config, tmp_path / "b.parquet", "1:36", world_size=2) == trained
    table = pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert {row["stream"] for row in table} == {"stories", "more"}
    assert max(row["step"] for row in table) == 36 and len(table) == 36 * BATCH
    # past the first epoch: the run went into a second (a mixture's epoch is the streams' total sample count)
    assert any(row["epoch"] == 1 for row in table)


def test_batches_name_the_documents_a_sample_was_cut_from(tmp_path, shards, corpus, tokenizer_dir, capsys):
    """The documents `slm batches --documents` names, tokenized again and cut at the recorded offset, give the
    sample's own tokens; --text prints their text from the source."""
    from slm.data.documents import load_documents
    from slm.data.shards import read_documents
    from slm.data.tokenizer import load_tokenizer

    config = write_yaml(tmp_path / "tiny.yaml", shards)
    out = tmp_path / "docs.parquet"
    assert main(["batches", str(config), "--steps", "3:4", "--tokens", "--documents", "--out", str(out)]) == 0
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 2 * 8
    tok = load_tokenizer(str(tokenizer_dir))
    stories = load_documents(str(corpus), "story", "train[:90%]")
    record = read_documents(shards / "train")
    for row in rows:
        ids = []
        for document in row["documents"]:
            ids += tok(stories[document]["story"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        offset = int(record.sample_offset[row["sample"]])
        assert ids[offset: offset + 63] == row["tokens"][1:], row["sample"]
        last = tok(stories[row["documents"][-1]]["story"], add_special_tokens=False)["input_ids"]
        assert len(row["documents"]) == 1 or len(ids) - len(last) - 1 < offset + 63  # no document more than held
    capsys.readouterr()
    assert main(["batches", str(config), "--steps", "3", "--rank", "0", "--text"]) == 1  # the source it records
    assert capsys.readouterr().err.strip().endswith(  # is shown, never opened: it may name any file of yours
        f"the shards of train record {str(corpus)!r}; name it with --source DATASET")
    assert main(["batches", str(config), "--steps", "3", "--rank", "0", "--text", "--source", str(corpus)]) == 0
    text = capsys.readouterr().out
    first = rows[0]
    assert f"step 3 rank 0 [0]: train sample {first['sample']}" in text
    assert stories[first["documents"][0]]["story"] in text


def test_batches_of_shards_without_a_document_record_say_so(tmp_path, shards, capsys):
    import shutil

    older = tmp_path / "older"
    shutil.copytree(shards / "train", older / "train")
    (older / "train" / "slm-documents.npz").unlink()
    (older / "eval").symlink_to(shards / "eval")
    assert main(["batches", str(write_yaml(tmp_path / "tiny.yaml", older)), "--steps", "1", "--documents"]) == 0
    out, err = capsys.readouterr()
    assert "note: shards written before slm recorded documents (no slm-documents.npz): samples only" in err
    assert len(out.splitlines()) == 8 and "documents" not in out


def test_a_run_folders_config_is_read_not_run(tmp_path, shards, capsys):
    """A run folder handed over names its data in its config.yaml: slm batches reads those folders as they are (the
    shard it decompresses goes to a scratch folder, not where the config says) and fetches no remote it names."""
    import shutil

    from slm.core.config import load_config, save_config

    data = tmp_path / "theirs"
    for split in ("train", "eval"):
        shutil.copytree(shards / split, data / split)
    (data / "train" / "shard.00000.mds").unlink()  # compressed only: reading it decompresses it
    before = sorted(p.name for p in (data / "train").iterdir())
    folder = tmp_path / "handed"
    folder.mkdir()
    save_config(load_config(write_yaml(tmp_path / "tiny.yaml", data)), folder / "config.yaml")
    assert main(["batches", str(folder), "--steps", "1", "--tokens"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 * 8 and sorted(p.name for p in (data / "train").iterdir()) == before
    assert f"the samples of train from {data / 'train'}, as the run's config.yaml names it (read, never written)" \
        in err
    save_config(load_config(write_yaml(tmp_path / "tiny.yaml", data), [f"data.train.remote={tmp_path}/remote"]),
                folder / "config.yaml")
    assert main(["batches", str(folder), "--steps", "1"]) == 1
    assert "which slm batches does not fetch for a run folder's config" in capsys.readouterr().err
    assert not (tmp_path / "remote").exists() and sorted(p.name for p in (data / "train").iterdir()) == before
