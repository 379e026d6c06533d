"""The bad-input catalogue: every command, one row each; one clear line, non-zero exit, no traceback, nothing
that was there changed (the workspace hashed before and after)."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from slm.cli import main


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def ws(tmp_path, corpus, tokenizer_dir):
    """A workspace with a good corpus, a good tokenizer, a few bad inputs and an existing output."""
    import json

    (tmp_path / "stories.jsonl").write_bytes(corpus.read_bytes())
    (tmp_path / "bad_export").mkdir()  # someone's export folder, its label naming a path
    (tmp_path / "bad_export" / "config.json").write_text("{}")
    (tmp_path / "bad_export" / "slm-run.json").write_text(json.dumps({"timestamp": {"batch": "1/../../x"}}))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "tiny.jsonl").write_text('{"story": "Hi."}\n')
    (tmp_path / "latin1.txt").write_bytes("first line\nsecond line\ncaf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "glob").mkdir()
    for name, text in (("a.txt", "first\n"), ("b.txt", "second\ncaf\xe9\n"), ("c.txt", "third\n")):
        (tmp_path / "glob" / name).write_bytes(text.encode("latin-1"))
    (tmp_path / "glob" / "d.jsonl").write_text('{"text": "a story"}\n')
    (tmp_path / "linked").mkdir()  # someone's corpus folder: b is a link to a file of yours outside it
    (tmp_path / "linked" / "a.jsonl").write_text('{"story": "a story"}\n')
    (tmp_path / "linked" / "b.jsonl").symlink_to(tmp_path / "tiny.jsonl")
    (tmp_path / "gz").mkdir()  # b is no gzip file, whatever its name says
    for name in ("a", "b", "c"):
        text = f'{{"story": "story {name}"}}\n'.encode()
        (tmp_path / "gz" / f"{name}.jsonl.gz").write_bytes(text if name == "b" else gzip.compress(text))
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("precious")
    nobos = tmp_path / "nobos"
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(nobos)
    with small_disks(tmp_path):
        yield tmp_path, tokenizer_dir


@contextmanager
def small_disks(root: Path):
    """root/full: a 16 kB tmpfs; root/ro: a read-only one (root only: as root a chmod'ed folder stays writable)."""
    mounted = []
    try:
        if os.geteuid() == 0:
            for name, options in (("full", "size=16k"), ("ro", "ro,size=16k")):
                (root / name).mkdir()
                subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(root / name)], check=True)
                mounted.append(root / name)
        yield
    finally:
        for path in mounted:
            subprocess.run(["umount", str(path)], check=False)


def on_small_disks(args: list[str]) -> bool:
    return any("{ws}/full" in a or "{ws}/ro" in a for a in args)


def needs_small_disks(args: list[str]) -> None:
    if on_small_disks(args) and os.geteuid() != 0:
        pytest.skip("a full or read-only disk is simulated with a tmpfs mount, which needs root")


def rows(cases: dict) -> list:
    """The case names; those on a full or read-only disk marked `root`."""
    return [pytest.param(name, marks=pytest.mark.root) if on_small_disks(cases[name][0]) else name for name in cases]


TOK = ["tokenize", "-f", "story", "-t", "{tok}"]
CASES = {
    "missing input path": (["tokenize", "-i", "{ws}/nope/stories.jsonl", "-t", "{tok}", "--out-dir", "{ws}/o"],
                           "input not found: {ws}/nope/stories.jsonl"),
    "missing input for tokenizer": (["tokenizer", "-i", "{ws}/nope.jsonl", "--out-dir", "{ws}/o"],
                                    "input not found"),
    "feature is not a column": (["tokenize", "-i", "{ws}/stories.jsonl", "-f", "text", "-t", "{tok}",
                                 "--out-dir", "{ws}/o"], "feature 'text' is not a column of {ws}/stories.jsonl; "
                                                         "columns: story"),
    "empty corpus": ([*TOK, "-i", "{ws}/empty.jsonl", "--out-dir", "{ws}/o"], "is empty: there are no documents"),
    "empty corpus for tokenizer": (["tokenizer", "-i", "{ws}/empty.jsonl", "-f", "story", "--out-dir", "{ws}/o"],
                                   "is empty"),
    "corpus too short for one sample": ([*TOK, "-i", "{ws}/tiny.jsonl", "-l", "512", "--out-dir", "{ws}/o"],
                                        "too few for one sample of seq_len 512"),
    "vocab too small": (["tokenizer", "-i", "{ws}/stories.jsonl", "-f", "story", "-v", "100", "--out-dir", "{ws}/o"],
                        "vocab size 100 is too small: byte-level BPE needs at least 259"),
    "tokenizer without bos/eos": ([*TOK[:-1], "{ws}/nobos", "-i", "{ws}/stories.jsonl", "--out-dir", "{ws}/o"],
                                  "has no bos token; name one with --bos-token"),
    "missing tokenizer": ([*TOK[:-1], "{ws}/no-tokenizer", "-i", "{ws}/stories.jsonl", "--out-dir", "{ws}/o"],
                          "tokenizer not found"),
    "seq_len below 2": ([*TOK, "-i", "{ws}/stories.jsonl", "-l", "1", "--out-dir", "{ws}/o"],
                        "--seq-len must be at least 2"),
    "unwritable output": ([*TOK, "-i", "{ws}/stories.jsonl", "--out-dir", "{ws}/a_file/mds"],
                          "cannot write to {ws}/a_file/mds"),
    "unwritable tokenizer output": (["tokenizer", "-i", "{ws}/stories.jsonl", "-f", "story", "-v", "300",
                                     "--out-dir", "{ws}/a_file/tok"], "cannot write to {ws}/a_file/tok"),
    "unwritable corpus output": (["corpus", "--out", "{ws}/a_file/x.jsonl", "-n", "3"],
                                 "cannot write {ws}/a_file/x.jsonl"),
    "non-UTF-8 txt": ([*TOK, "-i", "{ws}/latin1.txt", "-f", "text", "--out-dir", "{ws}/o"],
                      "input is not valid UTF-8: {ws}/latin1.txt line 3"),
    "non-UTF-8 file in the middle of a glob": ([*TOK, "-i", "{ws}/glob/*.txt", "-f", "text", "--out-dir", "{ws}/o"],
                                               "input is not valid UTF-8: {ws}/glob/b.txt line 2"),
    "glob matching nothing": ([*TOK, "-i", "{ws}/glob/*.parquet", "--out-dir", "{ws}/o"],
                              "no file matches {ws}/glob/*.parquet"),
    "glob of two file types": ([*TOK, "-i", "{ws}/glob/*", "--out-dir", "{ws}/o"],
                               "{ws}/glob/* matches files of 2 types (json, text)"),
    "existing output folder": ([*TOK, "-i", "{ws}/stories.jsonl", "--out-dir", "{ws}/existing"],
                               "{ws}/existing already exists; pass --overwrite"),
    "existing corpus file": (["corpus", "--out", "{ws}/stories.jsonl", "-n", "3"], "already exists"),
    "unknown split": ([*TOK, "-i", "{ws}/stories.jsonl", "-s", "validation", "--out-dir", "{ws}/o"],
                      "Unknown split"),
    "Hub id while offline": ([*TOK, "-i", "someone/no-such-dataset", "--out-dir", "{ws}/o"],
                             "cannot load 'someone/no-such-dataset' (HF_HUB_OFFLINE is set)"),
    "streamed: Hub id while offline": ([*TOK, "-i", "someone/no-such-dataset", "--stream", "--out-dir", "{ws}/o"],
                                       "cannot load 'someone/no-such-dataset' (HF_HUB_OFFLINE is set)"),
    "streamed: Hub URL while offline": ([*TOK, "-i", "hf://datasets/someone/no-such/a.jsonl", "--out-dir", "{ws}/o"],
                                        "cannot load 'hf://datasets/someone/no-such/a.jsonl' (HF_HUB_OFFLINE is set)"),
    "streamed: non-UTF-8 file in the middle of a glob": ([*TOK, "-i", "{ws}/glob/*.txt", "-f", "text", "--stream",
                                                          "--out-dir", "{ws}/o"],
                                                         "input is not valid UTF-8: {ws}/glob/b.txt line 2"),
    "streamed: a file in the middle of a glob that is not what its name says": (
        [*TOK, "-i", "{ws}/gz/*.jsonl.gz", "--stream", "--out-dir", "{ws}/o"],
        "cannot read {ws}/gz/*.jsonl.gz: Not a gzipped file"),
    "a file in the middle of a glob that is not what its name says": (
        [*TOK, "-i", "{ws}/gz/*.jsonl.gz", "--out-dir", "{ws}/o"],
        "cannot read {ws}/gz/*.jsonl.gz: Not a gzipped file"),
    "streamed: empty corpus": ([*TOK, "-i", "{ws}/empty.jsonl", "--stream", "--out-dir", "{ws}/o"],
                               "{ws}/empty.jsonl is empty: there are no documents to read"),
    "streamed: a feature it lacks": ([*TOK, "-i", "{ws}/glob/d.jsonl", "--stream", "--out-dir", "{ws}/o"],
                                     "feature 'story' is not a column of {ws}/glob/d.jsonl; columns: text"),
    "a corpus folder holding a link out": ([*TOK, "-i", "{ws}/linked", "--out-dir", "{ws}/o"],
                                           "corpus folder {ws}/linked holds b.jsonl, a link to {ws}/tiny.jsonl, "
                                           "which leads outside it"),
    "streamed: a corpus folder holding a link out": ([*TOK, "-i", "{ws}/linked", "--stream", "--out-dir", "{ws}/o"],
                                                     "corpus folder {ws}/linked holds b.jsonl, a link to "
                                                     "{ws}/tiny.jsonl, which leads outside it"),
    "a glob matching a link out": ([*TOK, "-i", "{ws}/linked/*.jsonl", "--out-dir", "{ws}/o"],
                                   "{ws}/linked/*.jsonl matches {ws}/linked/b.jsonl, which leads to {ws}/tiny.jsonl, "
                                   "outside {ws}/linked"),
    "streamed: a glob matching a link out": ([*TOK, "-i", "{ws}/linked/*.jsonl", "--stream", "--out-dir", "{ws}/o"],
                                             "{ws}/linked/*.jsonl matches {ws}/linked/b.jsonl, which leads to "
                                             "{ws}/tiny.jsonl, outside {ws}/linked"),
    "a compressed file that is not there": ([*TOK, "-i", "{ws}/no-such.jsonl.zst", "--out-dir", "{ws}/o"],
                                            "input not found: {ws}/no-such.jsonl.zst"),
    "streamed: a compressed file that is not there": ([*TOK, "-i", "no-such.jsonl.zst", "--stream", "--out-dir",
                                                       "{ws}/o"], "input not found: no-such.jsonl.zst"),
    "no documents asked for": ([*TOK, "-i", "{ws}/stories.jsonl", "--max-docs", "0", "--out-dir", "{ws}/o"],
                               "--max-docs must be at least 1, got 0"),
    "unknown kind of text document": ([*TOK, "-i", "{ws}/latin1.txt", "--txt-by", "word", "--out-dir", "{ws}/o"],
                                      "--txt-by takes line, paragraph, file, not 'word'"),
    "out-remote not a Hub location": ([*TOK, "-i", "{ws}/stories.jsonl", "--out-remote", "hf://datasets/only-org"],
                                      "'hf://datasets/only-org' is not a Hub location: use hf://datasets/ORG/NAME"),
    "plot of a folder without metrics": (["plot", "{ws}/existing", "--out", "{ws}/o.png"],
                                         "{ws}/existing has no metrics.jsonl"),
    "export of a file that is no checkpoint": (["export", "{ws}/stories.jsonl", "--out-dir", "{ws}/o"],
                                               "cannot read checkpoint {ws}/stories.jsonl"),
    "export with nowhere to write": (["export", "{ws}/stories.jsonl"], "give --out-dir, --out-repo, or both"),
    "tokenize onto a full disk": ([*TOK, "-i", "{ws}/stories.jsonl", "--out-dir", "{ws}/full/mds"],
                                  "no space left on device"),
    "tokenize onto a read-only disk": ([*TOK, "-i", "{ws}/stories.jsonl", "--out-dir", "{ws}/ro/mds"],
                                       "cannot write to {ws}/ro/mds: Read-only file system"),
    "corpus onto a full disk": (["corpus", "--out", "{ws}/full/stories.jsonl", "-n", "2000"],
                                "cannot write {ws}/full/stories.jsonl: No space left on device"),
    "generate from a missing model": (["generate", "{ws}/nope", "--prompt", "Once"], "model folder not found"),
    "eval of a missing model": (["eval", "{ws}/nope", "--data", "{ws}/existing"],
                                "{ws}/nope is neither a checkpoint file nor an exported model folder"),
    "eval on nothing": (["eval", "{ws}/nope"],
                        "nothing to evaluate on: give --data MDS_FOLDER, --tasks NAME..., or both"),
    "sweep of a missing yaml": (["sweep", "--grid", "seed=0,1", "{ws}/nope.yaml"],
                                "config file not found: {ws}/nope.yaml"),
    "logprobs of an export labelled with a path": (["logprobs", "{ws}/bad_export", "--data", "{shards}/eval",
                                                    "--out-dir", "{ws}/o"], "{ws}/bad_export/slm-run.json: "
                                                   "timestamp.batch is '1/../../x', not a whole number from 0"),
}


@pytest.mark.parametrize("name", rows(CASES))
def test_bad_input(name, ws, shards, capsys):
    root, tok = ws
    args, expected = CASES[name]
    needs_small_disks(args)
    fill = {"ws": str(root), "tok": str(tok), "shards": str(shards)}
    before = snapshot(root)
    code = main([a.format(**fill) for a in args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code != 0
    assert len(errors) == 1, err
    assert expected.format(**fill) in errors[0]
    assert "Traceback" not in err
    assert snapshot(root) == before
    assert not (root / "o").exists()


def test_console_script_exits_non_zero_with_one_line(tmp_path, tokenizer_dir):
    from helpers import run_slm

    proc = run_slm("tokenize", "-i", str(tmp_path / "missing.jsonl"), "-t", str(tokenizer_dir),
                   "--out-dir", str(tmp_path / "o"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"slm tokenize: error: input not found: {tmp_path}/missing.jsonl "
                                                "(give a file, a folder, or a Hub dataset id)"]


TRAIN_CASES = {
    "missing data folder": (["data.train.local={ws}/nowhere"], "data.train.local = {ws}/nowhere holds no MDS shards"),
    "data/model vocab mismatch": (["model.vocab_size=100"], "tokenized with a {vocab}-token tokenizer but "
                                                            "model.vocab_size is 100"),
    "seq_len longer than positions": (["model.max_position_embeddings=32"],
                                      "data.train has seq_len 64 but the model has max_position_embeddings 32"),
    "unknown model class": (["model.class=gpt7"], "unknown model class 'gpt7'"),
    "unknown model kwarg": (["model.hiden_size=8"], "unknown config key 'model.hiden_size' for LlamaConfig; "
                                                    "did you mean 'model.hidden_size'?"),
    "unknown key": (["max_duraton=5ba"], "unknown config key 'max_duraton' in the command line"),
    "wrong type": (["eval_batches=some"], "config key 'eval_batches' in the command line (eval_batches=some) has "
                                          "the wrong type"),
    "time without unit": (["max_duration=100"], "config key 'max_duration' = '100' is not a time"),
    "unsafe run_name": (["run_name=../up"], "run_name '../up' is not a safe folder name"),
    "auto microbatch on CPU": (["device_microbatch_size=auto"], "device_microbatch_size=auto needs a GPU"),
    "tokenizer not the data's": (["tokenizer={ws}/other_tok"], ", not with {ws}/other_tok (content hashes differ)"),
    "tokenizer of the data's size, other ids": (["tokenizer={ws}/swapped_tok"], ", not with {ws}/swapped_tok (content "
                                                "hashes differ); if these shards "
                                                "were made with this tokenizer by an older slm under other library "
                                                "versions, tokenize them again"),
    "hub.repo not a repo id": (["hub.repo=just-a-name"], "config key 'hub.repo' = 'just-a-name' is not a Hub repo id"),
    "hub.retries below 1": (["hub.repo=me/x", "hub.retries=0"], "config key 'hub.retries' must be at least 1"),
    "unknown logging key": (["logging.wandb.projekt=x"], "unknown config key 'logging.wandb.projekt' in the command "
                                                         "line (logging.wandb.projekt=x); did you mean "
                                                         "'logging.wandb.project'?"),
    "malformed yaml": (["{ws}/malformed.yaml"], "cannot parse {ws}/malformed.yaml"),
    "negative lr": (["optimizer.lr=-1e-3"], "config key 'optimizer.lr' must be positive, got -0.001"),
    "zero batch": (["global_batch_size=0"], "config key 'global_batch_size' must be positive, got 0"),
    "run_name with a slash": (["run_name=a/b"], "run_name 'a/b' is not a safe folder name"),
    "data with no samples": (["data.train.local={ws}/no_samples"], "{ws}/no_samples holds no samples"),
    "truncated shard": (["data.train.local={ws}/truncated_shard"], "shard {ws}/truncated_shard/shard.00000.mds.zstd "
                                                                   "is 1000 bytes but index.json says"),
    "corrupt shard": (["data.train.local={ws}/corrupt_shard"], "shard {ws}/corrupt_shard/shard.00000.mds.zstd does "
                                                               "not match its sha1 in index.json"),
    "shard missing from its folder": (["data.train.local={ws}/incomplete"], "{ws}/incomplete lacks the shard file "
                                                                          "shard.00000.mds.zstd its index.json names"),
    "truncated index.json": (["data.train.local={ws}/truncated_index"],
                             "{ws}/truncated_index/index.json is not valid JSON"),
    "run folder of another model": (["run_name=other"], "{ws}/ckpt/other holds a run of another model "
                                                        "(model.hidden_size is 16 there, 32 here)"),
    "checkpoint of another model": (["run_name=foreign"], "the checkpoint {ws}/ckpt/foreign/ep0-ba2-rank0.pt does "
                                                          "not fit this model (size mismatch for"),
    "W&B on without a login": (["logging.wandb.project=slm-test"], "logging.wandb.project is slm-test but there is "
                                                                   "no W&B login for api.wandb.ai: run `wandb login`"),
    "checkpoints onto a full disk": (["save_folder={ws}/full/{{run_name}}"],
                                     "no space left on device writing {ws}/full/tiny"),
    # The trust boundary (docs/security.md; tests/core/test_trust.py has the Hub's and the other commands' cases).
    "yaml reading the environment": (["{ws}/env.yaml"], "{ws}/env.yaml calls the resolver oc.env (${{oc.env:...}}): "
                                                        "slm resolves no interpolation that reads the environment"),
    "override decoding the environment": (["logging.wandb.group=${{oc.decode:${{oc.env:HF_TOKEN}}}}"],
                                          "the override logging.wandb.group calls the resolver oc.decode"),
    "token pasted into an override": (["logging.wandb.group=x-{token}"], "the config: 'logging.wandb.group' holds a "
                                                                         "secret (the value of a token, key or "
                                                                         "password this process can see)"),
    "shard name leading outside": (["data.train.local={ws}/escaping"], "shard index {ws}/escaping/index.json, "
                                                                       "shard 0: raw_data.basename names "
                                                                       "'../../ESCAPED.mds', which is not a relative "
                                                                       "path below its folder"),
    "warm start off a checkpoint carrying code": (["run_name=branch", "load.path={ws}/payload.pt"],
                                                  "refused checkpoint {ws}/payload.pt: its pickle names io.open"),
}


@pytest.fixture(scope="module")
def other_model_run(tmp_path_factory, shards) -> Path:
    """A real 2-batch run of a narrower model (hidden_size 16)."""
    from helpers import train, write_yaml

    root = tmp_path_factory.mktemp("other-model")
    train(write_yaml(root / "narrow.yaml", shards, hidden_size=16, intermediate_size=32), "max_duration=2ba")
    return root / "ckpt" / "narrow"


@pytest.fixture
def train_ws(tmp_path, shards, tokenizer_dir, other_model_run, monkeypatch):
    import json
    import shutil

    from slm.data.tokenizer import train_tokenizer

    from helpers import edited_tokenizer, plant_payload, swap_a_b, write_yaml

    token = "hf_CatalogueTokenNeverWritten"
    monkeypatch.setenv("HF_TOKEN", token)
    config = write_yaml(tmp_path / "tiny.yaml", shards)
    (tmp_path / "env.yaml").write_text(f"base: {config}\nlogging: {{wandb: {{group: '${{oc.env:HF_TOKEN}}'}}}}\n")
    plant_payload(other_model_run / "ep0-ba2-rank0.pt", tmp_path / "payload.pt", tmp_path / "MARKER")
    run = tmp_path / "ckpt" / "tiny"
    run.mkdir(parents=True)
    (run / "ep0-ba4-rank0.pt").write_bytes(b"an earlier run's checkpoint")
    train_tokenizer([["some other text entirely"]], 300).save_pretrained(tmp_path / "other_tok")
    edited_tokenizer(tokenizer_dir, tmp_path / "swapped_tok", swap_a_b)
    (tmp_path / "malformed.yaml").write_text(f"base: {config}\nmax_duration: [16ba\n")
    for name in ("no_samples", "truncated_shard", "corrupt_shard", "truncated_index", "escaping", "incomplete"):
        shutil.copytree(shards / "train", tmp_path / name, ignore=shutil.ignore_patterns("*.mds"))
    (tmp_path / "incomplete" / "shard.00000.mds.zstd").unlink()
    index = json.loads((tmp_path / "no_samples" / "index.json").read_text())
    (tmp_path / "no_samples" / "index.json").write_text(json.dumps({**index, "shards": []}))
    zstd = "shard.00000.mds.zstd"
    (tmp_path / "truncated_shard" / zstd).write_bytes((tmp_path / "truncated_shard" / zstd).read_bytes()[:1000])
    data = bytearray((tmp_path / "corrupt_shard" / zstd).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    (tmp_path / "corrupt_shard" / zstd).write_bytes(bytes(data))
    index = json.loads((tmp_path / "escaping" / "index.json").read_text())
    index["shards"][0]["raw_data"]["basename"] = "../../ESCAPED.mds"
    (tmp_path / "escaping" / "index.json").write_text(json.dumps(index))
    text = (tmp_path / "truncated_index" / "index.json").read_text()
    (tmp_path / "truncated_index" / "index.json").write_text(text[: len(text) // 2])
    shutil.copytree(other_model_run, tmp_path / "ckpt" / "other")  # with its run.json
    shutil.copytree(other_model_run, tmp_path / "ckpt" / "foreign")
    (tmp_path / "ckpt" / "foreign" / "run.json").unlink()  # only the checkpoint can tell
    vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(tokenizer_dir))
    with small_disks(tmp_path):
        yield config, {"ws": str(tmp_path), "vocab": str(vocab), "token": token}


@pytest.mark.train
@pytest.mark.parametrize("name", rows(TRAIN_CASES))
def test_bad_training_config(name, train_ws, capsys, monkeypatch):
    from slm.train import main as train_main

    config, fill = train_ws
    if name.startswith("W&B"):  # a machine with no W&B login of any kind
        for var in ("WANDB_MODE", "WANDB_API_KEY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("NETRC", f"{fill['ws']}/no-netrc")
        monkeypatch.setenv("WANDB_CONFIG_DIR", f"{fill['ws']}/no-wandb-config")
    overrides, expected = TRAIN_CASES[name]
    needs_small_disks(overrides)
    if overrides[0].endswith(".yaml"):
        config, overrides = Path(overrides[0].format(**fill)), overrides[1:]
    root = Path(fill["ws"])
    before = snapshot(root)
    code = train_main([str(config), *(o.format(**fill) for o in overrides)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and len(errors) == 1, err
    assert expected.format(**fill) in errors[0]
    assert "Traceback" not in err
    after = snapshot(root)
    if "full disk" in name:  # what it wrote before the disk filled up stays, beside everything that was there
        after = {k: v for k, v in after.items() if k in before}
    assert after == before


def test_training_accepts_the_data_tokenizer_saved_with_a_post_processor(tmp_path, shards, tokenizer_dir):
    """Newer transformers save the same tokenizer with a post-processor: the shards' tokenizer all the same."""
    from slm.core.config import load_config
    from slm.training.preflight import preflight

    from helpers import bos_template, edited_tokenizer, write_yaml

    templated = edited_tokenizer(tokenizer_dir, tmp_path / "templated_tok", bos_template)
    plan = preflight(load_config(write_yaml(tmp_path / "tiny.yaml", shards), [f"tokenizer={templated}"]))
    assert plan.tokenizer_identity["name"] == str(templated)
    config = plan.model.model.config  # training's model config carries the tokenizer's special ids
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 1, 2)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.train
def test_global_batch_not_divisible_by_processes(tmp_path, shards):
    from helpers import train, write_yaml

    config = write_yaml(tmp_path / "tiny.yaml", shards)
    proc = train(config, "global_batch_size=7", procs=2, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("slm train: error: global_batch_size 7 is not divisible by the 2 processes") == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ckpt").exists()
