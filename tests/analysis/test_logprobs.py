"""`slm logprobs`: per-token log-probabilities of the eval split under every checkpoint of one tiny run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from slm.cli import main
from slm.data.documents import load_documents
from slm.data.tokenizer import load_tokenizer
from slm.training.export import model_from_checkpoint, read_checkpoint

from helpers import SLM, run_slm, shown_on_failure, train, write_yaml

LABELS = ["ba1", "ba2", "ba4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, shards) -> Path:
    """Checkpoints at batches 1, 2 and 4."""
    root = tmp_path_factory.mktemp("lp")
    train(write_yaml(root / "t.yaml", shards), "run_name=lp", "max_duration=4ba")
    return root / "ckpt" / "lp"


@pytest.fixture(scope="module")
def tables(run, shards, tmp_path_factory) -> tuple[Path, str]:
    """The tables of every checkpoint of the run, from the real `slm` command, and what it printed."""
    out = tmp_path_factory.mktemp("tables")
    proc = run_slm("logprobs", str(run), "-d", str(shards / "eval"), "--out-dir", str(out), "--batch-size", "5")
    return out, proc.stdout


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    """The run's last checkpoint (batch 4), exported."""
    out = tmp_path_factory.mktemp("export") / "hf"
    run_slm("export", str(run / "latest-rank0.pt"), "-o", str(out))
    return out


def read(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sample, token_ids and logprobs of a table, as arrays."""
    table = pq.read_table(path)
    return (table["sample"].to_numpy(), np.array(table["token_ids"].to_pylist()),
            np.array(table["logprobs"].to_pylist(), dtype=np.float32))


def assert_same_figures(a: Path, b: Path) -> None:
    for x, y in zip(read(a), read(b), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, equal_nan=True)


def eval_split_samples(corpus: Path, tokenizer_dir: Path, seq_len: int = 64) -> np.ndarray:
    """The eval split's samples by the chunking rule, computed here from the corpus (so the order is checked too)."""
    tok = load_tokenizer(str(tokenizer_dir))
    docs = load_documents(str(corpus), "story", "train[90%:]")["story"]
    stream = [i for doc in docs for i in [*tok(doc, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    n = len(stream) // (seq_len - 1)
    pieces = np.array(stream[: n * (seq_len - 1)]).reshape(n, seq_len - 1)
    return np.concatenate([np.full((n, 1), tok.bos_token_id), pieces], axis=1)


@pytest.mark.train
def test_every_checkpoint_gets_the_logprobs_of_its_own_forward_pass(run, tables, corpus, tokenizer_dir):
    out, stdout = tables
    assert sorted(p.name for p in out.iterdir()) == [f"{label}.parquet" for label in LABELS]  # no partial files
    assert [line.split(":")[0] for line in stdout.splitlines()] == LABELS
    expected_ids = eval_split_samples(corpus, tokenizer_dir)
    for label in LABELS:
        schema = pq.read_schema(out / f"{label}.parquet")
        assert schema.names == ["sample", "token_ids", "logprobs"]
        assert schema.types == [pa.int64(), pa.list_(pa.int32()), pa.list_(pa.float32())]
        samples, ids, logprobs = read(out / f"{label}.parquet")
        assert samples.tolist() == list(range(len(expected_ids)))
        assert np.array_equal(ids, expected_ids)
        model = model_from_checkpoint(read_checkpoint(next(run.glob(f"ep*-{label}-rank0.pt"))))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # forwards this small wait on a second thread far longer than they compute
        try:
            for row, lp in zip(ids, logprobs, strict=True):
                x = torch.tensor(row)[None]
                with torch.no_grad():
                    logits = model(x).logits.float()
                direct = torch.log_softmax(logits[0, :-1], -1).gather(-1, x[0, 1:, None])[:, 0]
                assert np.isnan(lp[0])
                assert torch.allclose(torch.from_numpy(lp[1:]), direct, atol=1e-5)
        finally:
            torch.set_num_threads(threads)


@pytest.mark.train
def test_a_rerun_skips_what_is_done(run, tables, shards, capsys):
    out, _ = tables
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["logprobs", str(run), "-d", str(shards / "eval"), "--out-dir", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"skipped {label} (already in {out / label}.parquet)"
                                                    for label in LABELS]
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


@pytest.mark.train
def test_two_processes_divide_a_suites_checkpoints_and_write_the_tables_of_one(run, exported, tables, shards,
                                                                               tmp_path):
    """`composer -n 2 slm logprobs RUN EXPORT ...`: each process takes every other checkpoint of the two, each run's
    tables in OUT/NAME; the run's are one process's, byte for byte, the export's its last checkpoint's figures; a table
    removed is the only one a second launch writes."""
    out, _ = tables
    args = ["logprobs", str(run), str(exported), "-d", str(shards / "eval"), "--batch-size", "5", "--out-dir"]
    one = {f"lp/{p.name}": p.read_bytes() for p in out.iterdir()}  # the run's tables, one process
    cmd = [str(Path(sys.executable).parent / "composer"), "-n", "2", SLM, *args, str(tmp_path / "two")]
    two = tmp_path / "two"
    for attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        shown_on_failure(cmd, proc.stderr)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if attempt == 0:
            assert "process 0 of 2: 2 of the 4 checkpoints" in proc.stdout, proc.stdout
            assert sorted(str(p.relative_to(two)) for p in two.rglob("*.parquet")) == \
                ["hf/ba4.parquet", "lp/ba1.parquet", "lp/ba2.parquet", "lp/ba4.parquet"]
            assert {f"lp/{p.name}": p.read_bytes() for p in (two / "lp").iterdir()} == one
            assert_same_figures(two / "hf" / "ba4.parquet", out / "ba4.parquet")  # the export of batch 4
            kept = {p: p.stat().st_mtime_ns for p in two.rglob("*.parquet") if p.name != "ba2.parquet"}
            (two / "lp" / "ba2.parquet").unlink()  # ba2 is process 1's
    assert (two / "lp" / "ba2.parquet").read_bytes() == one["lp/ba2.parquet"]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


@pytest.mark.train
def test_a_table_records_how_it_was_computed_and_bf16_stays_near_float32(run, tables, shards, tmp_path):
    out, _ = tables
    assert pq.read_schema(out / "ba4.parquet").metadata == {
        b"slm.precision": b"float32", b"slm.batch_size": b"5", b"slm.device": b"cpu"}
    assert main(["logprobs", str(run), "-d", str(shards / "eval"), "--out-dir", str(tmp_path), "--checkpoints", "ba4",
                 "--precision", "bf16"]) == 0  # the GPU's default, run here on the CPU
    assert pq.read_schema(tmp_path / "ba4.parquet").metadata == {
        b"slm.precision": b"bf16", b"slm.batch_size": b"16", b"slm.device": b"cpu"}
    (_, ids, bf16), (_, ids32, fp32) = read(tmp_path / "ba4.parquet"), read(out / "ba4.parquet")
    assert (ids == ids32).all() and not np.array_equal(bf16[:, 1:], fp32[:, 1:])  # the bf16 pass did run
    np.testing.assert_allclose(bf16, fp32, atol=0.15, equal_nan=True)  # bf16's rounding, not another model


@pytest.mark.train
def test_a_split_too_big_to_read_once_is_read_batch_by_batch_to_the_same_tables(run, tables, shards, tmp_path,
                                                                                  monkeypatch):
    import slm.analysis.samples

    out, _ = tables
    monkeypatch.setattr(slm.analysis.samples, "READ_ONCE", 0)  # no split fits: read from the shards each batch
    assert main(["logprobs", str(run), "-d", str(shards / "eval"), "--out-dir", str(tmp_path), "--batch-size",
                 "5"]) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.train
def test_checkpoints_selects_labels_and_names_the_ones_there_are(run, tables, shards, tmp_path, capsys):
    data = str(shards / "eval")
    run_slm("logprobs", str(run), "-d", data, "--out-dir", str(tmp_path / "one"), "--checkpoints", "ba2")
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["ba2.parquet"]
    assert_same_figures(tmp_path / "one" / "ba2.parquet", tables[0] / "ba2.parquet")

    assert main(["logprobs", str(run), "-d", data, "--out-dir", str(tmp_path / "two"), "--checkpoints",
                 "ba2,ba3"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"slm logprobs: error: no checkpoint ba3 in {run}; it has: ba1, ba2, ba4"]
    assert not (tmp_path / "two").exists()


@pytest.mark.train
def test_a_checkpoint_file_and_its_export_folder_give_the_figures_of_the_run(run, exported, tables, shards, tmp_path):
    for model in (run / "latest-rank0.pt", exported):  # labelled ba4 by the checkpoint, by slm-run.json
        assert main(["logprobs", str(model), "-d", str(shards / "eval"), "--out-dir", str(tmp_path / model.name)]) == 0
        assert_same_figures(tmp_path / model.name / "ba4.parquet", tables[0] / "ba4.parquet")


@pytest.mark.train
def test_hub_dataset_branches_and_a_hub_model(fake_hub, run, tables, exported, shards, tmp_path, capsys):
    out, data = tables[0], str(shards / "eval")
    assert main(["logprobs", str(run), "-d", data, "--out-repo", "me/lp", "--checkpoints", "ba1,ba2"]) == 0
    # With the tables already in --out-dir, the missing branch is pushed from there, nothing is recomputed.
    assert main(["logprobs", str(run), "-d", data, "--out-repo", "me/lp", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-3:-1] == [f"skipped {label} (already in {out / label}.parquet and hf://datasets/me/lp@{label})"
                              for label in ("ba1", "ba2")]
    assert printed[-1].startswith(f"ba4: taken from {out / 'ba4.parquet'}; wrote hf://datasets/me/lp@ba4 in ")
    for label in LABELS:
        branch = fake_hub.repo_dir("me/lp", "dataset", label)
        assert {p.name for p in branch.iterdir()} - {".gitattributes"} == {"logprobs.parquet"}
        assert_same_figures(branch / "logprobs.parquet", out / f"{label}.parquet")

    fake_hub.repo_dir("me/model").mkdir(parents=True)
    shutil.copytree(exported, fake_hub.repo_dir("me/model", revision="ba4"))
    assert main(["logprobs", "me/model", "-d", data, "--out-dir", str(tmp_path / "hub")]) == 0
    assert_same_figures(tmp_path / "hub" / "ba4.parquet", out / "ba4.parquet")


def test_bad_inputs_are_one_line(run, shards, tmp_path, capsys, monkeypatch):
    data = str(shards / "eval")
    for rank, world in (("2", "2"), ("x", "2")):
        with monkeypatch.context() as env:
            env.setenv("RANK", rank)
            env.setenv("WORLD_SIZE", world)
            assert main(["logprobs", str(run), "-d", data, "--out-dir", str(tmp_path / "out")]) == 1
    assert main(["logprobs", str(tmp_path / "nothing"), "-d", data, "--out-dir", str(tmp_path)]) == 1
    assert main(["logprobs", str(tmp_path), "-d", data]) == 1
    assert main(["logprobs", str(tmp_path), "-d", data, "--out-dir", str(tmp_path / "out")]) == 1
    assert main(["logprobs", str(run), "-d", data, "--out-dir", str(tmp_path / "out"), "--batch-size", "0"]) == 1
    assert main(["logprobs", str(run), str(run), "-d", data, "--out-repo", "me/lp"]) == 1
    assert main(["logprobs", str(run), str(run) + "/", "-d", data, "--out-dir", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "slm logprobs: error (rank 2): RANK 2 is not one of the WORLD_SIZE 2 processes: set 0 <= RANK < WORLD_SIZE",
        "slm logprobs: error (rank x): RANK and WORLD_SIZE must be whole numbers (they divide the checkpoints among "
        "processes), got 'x' and '2'",
        f"slm logprobs: error: model not found: {tmp_path / 'nothing'}",
        "slm logprobs: error: give --out-dir, --out-repo, or both",
        f"slm logprobs: error: {tmp_path} holds no complete checkpoint (ep*-ba*-rank0.pt) and is not a folder "
        "written by `slm export` (no config.json)",
        "slm logprobs: error: --batch-size must be at least 1, got 0",
        "slm logprobs: error: --out-repo takes the tables of one MODEL (a branch per checkpoint): push each run in "
        "its own call, or give --out-dir",
        "slm logprobs: error: two MODELs end in the same name (lp): their tables would share --out-dir/NAME; give "
        "them in separate calls"]
