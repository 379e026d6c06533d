"""lm-evaluation-harness tasks on every checkpoint (`slm eval --tasks`, slm/analysis/harness.py): a BLiMP-style task of
minimal pairs the test writes, found through lm-eval's own include_path, scored by lm-eval's HF model class; its
accuracies land in the eval table beside the training metrics and equal log p(good) >= log p(bad) computed here.
lm-eval comes with the analysis extra, on the current stack (CI's `make test-stack STACK=current`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import slm
from slm.analysis import trained_models
from slm.analysis.evaluate import read_table

from helpers import run_slm, train, write_yaml

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (the analysis extra)")

TASK = """task: slm_pairs
dataset_path: json
dataset_kwargs:
  data_files:
    train: {pairs}
output_type: multiple_choice
validation_split: train
doc_to_text: ""
doc_to_target: 0
doc_to_choice: "{{{{[sentence_good, sentence_bad]}}}}"
num_fewshot: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def pairs_task(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, list[tuple[str, str]]]:
    """A folder with the task yaml (BLiMP's format) and 32 pairs: a sentence of the corpus, and its words in
    reverse order."""
    folder = tmp_path_factory.mktemp("tasks")
    sentences = [s.strip() for line in corpus.read_text().splitlines()
                 for s in json.loads(line)["story"].split(". ") if len(s.split()) >= 4]
    pairs = [(f"{s}.", " ".join(reversed(s.split())) + ".") for s in sentences[:32]]
    (folder / "pairs.jsonl").write_text("".join(json.dumps({"sentence_good": g, "sentence_bad": b}) + "\n"
                                                for g, b in pairs))
    (folder / "slm_pairs.yaml").write_text(TASK.format(pairs=folder / "pairs.jsonl"))
    return folder, pairs


def log_p(model: torch.nn.Module, tokenizer, sentence: str) -> float:
    """log p(sentence | <bos>) as lm-eval scores a choice: the text after its target delimiter, a space."""
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(" " + sentence, add_special_tokens=False).input_ids]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return logprobs.gather(1, ids[0, 1:, None]).sum().item()


@pytest.mark.stack
@pytest.mark.train
@needs_lm_eval
def test_task_accuracy_of_every_checkpoint_lands_in_the_eval_table(tmp_path, shards, pairs_task, monkeypatch):
    folder, pairs = pairs_task
    train(write_yaml(tmp_path / "run.yaml", shards), "run_name=pairs", "max_duration=8ba")
    run, table = tmp_path / "ckpt" / "pairs", tmp_path / "evals.parquet"
    args = ["eval", str(run), "--tasks", "slm_pairs", "--include-path", str(folder), "--data", str(shards / "eval"),
            "--max-batches", "1", "--out", str(table)]
    loads, load = [], trained_models.load_tokenizer
    monkeypatch.setattr(trained_models, "load_tokenizer", lambda *a, **kw: loads.append(a) or load(*a, **kw))
    assert "evaluated 4 checkpoint(s)" in run_slm(*args).stdout
    assert len(loads) == 4  # a checkpoint's tokenizer is loaded once for its data and its task
    rows = read_table(table)
    accuracy = {row["label"]: row["value"] for row in rows if row["metric"] == "slm_pairs/acc"}
    assert [row["samples"] for row in rows if row["metric"] == "slm_pairs/acc"] == [32] * 4
    assert {row["data"] for row in rows} == {str(shards / "eval"), "lm-eval:slm_pairs"}
    assert {row["metric"] for row in rows if row["data"] == str(shards / "eval")} >= {"CrossEntropy", "Accuracy"}
    for checkpoint in slm.open(run)["pairs"].checkpoints:
        model, tokenizer = checkpoint.model(), checkpoint.tokenizer()
        right = [log_p(model, tokenizer, good) >= log_p(model, tokenizer, bad) for good, bad in pairs]
        assert accuracy[checkpoint.label] == sum(right) / len(right), checkpoint.label
    assert "(4 already there)" in run_slm(*args).stdout  # nothing evaluated twice
    assert len(read_table(table)) == len(rows)

    wrong = run_slm("eval", str(run), "--tasks", "no_such_task", "--include-path", str(folder), "--out",
                    str(table), check=False)
    assert wrong.returncode == 1 and wrong.stderr.strip().splitlines()[-1] == (
        "slm eval: error: unknown lm-eval task(s) no_such_task: `lm-eval ls tasks` lists the built-in ones; a "
        "task of your own is a yaml in a folder given as --include-path")
    assert len(read_table(table)) == len(rows)


@pytest.mark.skipif(HAS_LM_EVAL, reason="lm-eval is installed here: the missing-extra message cannot show")
def test_tasks_without_lm_eval_is_one_line(tmp_path):
    proc = run_slm("eval", str(tmp_path), "--tasks", "blimp", "--out", str(tmp_path / "t.csv"), check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        "slm eval: error: slm eval --tasks needs lm_eval, which is not installed"), proc.stderr
    assert "pip install -e '.[analysis]' on the current stack" in proc.stderr
    assert not (tmp_path / "t.csv").exists()
