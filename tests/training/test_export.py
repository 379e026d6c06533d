"""Exporting a trained checkpoint to a HuggingFace folder, and generating from it."""

import json

import pytest
import torch
import transformers

from slm.training.export import model_from_checkpoint
from slm.training.metrics import build_metrics, byte_lengths
from slm.training.model import CausalLM, build_hf_model

from helpers import REPO, final_state, mds_tokens, run_slm, train, write_yaml

pytestmark = pytest.mark.train


@pytest.fixture(scope="module", params=["demo-llama.yaml", "demo-mamba.yaml"])
def exported(request, tmp_path_factory, shards):
    root = tmp_path_factory.mktemp("export")
    config = write_yaml(root / "run.yaml", shards, base=request.param)
    train(config, "run_name=exp", "max_duration=4ba", "eval_interval=4ba")
    run_slm("export", str(root / "ckpt" / "exp" / "latest-rank0.pt"), "-o", str(root / "hf"))
    return root


@pytest.mark.stack
def test_exported_logits_equal_the_composer_models(exported, tokenizer_dir):
    state = final_state(exported / "ckpt" / "exp")
    info = state["callbacks"]["RunInfo"]
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    composer_model = CausalLM(build_hf_model(info["config"]["model"], seed=123), tok,
                              metrics=build_metrics(byte_lengths(tok)))
    composer_model.load_state_dict(state["model"])  # the Composer module's own state dict
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported / "hf").eval()
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        composer_logits = composer_model.eval().forward({"input_ids": ids})["logits"]
        assert torch.equal(hf(input_ids=ids).logits, composer_logits)
        assert torch.equal(model_from_checkpoint(state)(input_ids=ids).logits, composer_logits)


@pytest.mark.stack
def test_export_folder_is_self_contained(exported):
    folder = exported / "hf"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    run = json.loads((folder / "slm-run.json").read_text())
    assert run["timestamp"]["batch"] == 4 and run["config"]["run_name"] == "exp"
    assert run["starts"][0]["versions"]["mosaicml"] == "0.32.1" and run["starts"][0]["git_commit"]
    rows = [json.loads(line) for line in (exported / "ckpt" / "exp" / "metrics.jsonl").read_text().splitlines()]
    assert run["metrics"]["metrics/eval/CrossEntropy"] == rows[-1]["metrics/eval/CrossEntropy"]
    card = (folder / "README.md").read_text()
    assert "exp at batch 4" in card and "parameters (embeddings included)" in card
    assert f"| metrics/eval/CrossEntropy | {rows[-1]['metrics/eval/CrossEntropy']:.4g} |" in card
    assert f"| slm commit | {run['starts'][0]['git_commit']} |" in card
    pipe = transformers.pipeline("text-generation", model=str(folder), tokenizer=str(folder))
    assert pipe("Once upon a time", max_new_tokens=5, do_sample=False)[0]["generated_text"].startswith("Once")


@pytest.mark.stack
def test_export_carries_the_tokenizers_special_ids(exported):
    folder = exported / "hf"
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    for ids in (config, generation):
        assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (0, 1, 2)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    if config["model_type"] == "llama":
        assert tok.model_max_length == config["max_position_embeddings"] == 64
    else:  # mamba has no context limit
        assert "max_position_embeddings" not in config and tok.model_max_length > 10**9


SENTENCE = "One day the girl went under a tree."  # no token twice in it: a one-layer model learns it in 32 batches


@pytest.fixture(scope="module", params=["demo-llama.yaml", "demo-mamba.yaml"])
def says_eos(request, tmp_path_factory, tokenizer_dir):
    """The export of a model that learnt one sentence and `<eos>` after it: every document is that sentence."""
    import shutil

    root = tmp_path_factory.mktemp("eos")
    (root / "one.jsonl").write_text((json.dumps({"story": SENTENCE}) + "\n") * 400)
    run_slm("tokenize", "-i", str(root / "one.jsonl"), "-f", "story", "-t", str(tokenizer_dir), "-l", "16",
            "--out-dir", str(root / "mds" / "train"))
    shutil.copytree(root / "mds" / "train", root / "mds" / "eval")
    config = write_yaml(root / "run.yaml", root / "mds", base=request.param)
    train(config, "run_name=eos", "max_duration=32ba", "optimizer.lr=0.02", "save_interval=32ba",
          "early_checkpoints=0", "eval_interval=32ba", "eval_batches=1")
    run_slm("export", str(root / "ckpt" / "eos" / "latest-rank0.pt"), "-o", str(root / "hf"))
    return root / "hf"


def test_hf_generation_stops_at_eos_without_being_told(says_eos):
    tok = transformers.AutoTokenizer.from_pretrained(says_eos)
    prompt = tok("One day", return_tensors="pt").input_ids
    limit = 20
    pipe = transformers.pipeline("text-generation", model=str(says_eos))  # it samples unless told otherwise
    out = pipe("One day", max_new_tokens=limit, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(says_eos).eval()
    with torch.no_grad():
        ids = model.generate(prompt, max_new_tokens=limit)[0].tolist()
    for generated in (list(out), ids):
        new = generated[prompt.shape[1]:]
        assert new[-1] == tok.eos_token_id and tok.eos_token_id not in new[:-1] and len(new) < limit, new
        assert tok.decode(generated, skip_special_tokens=True) == SENTENCE


def test_generate_is_seeded_and_refuses_to_clobber(exported):
    folder = str(exported / "hf")
    a = run_slm("generate", folder, "-p", "One day", "-n", "20", "--seed", "3").stdout
    b = run_slm("generate", folder, "-p", "One day", "-n", "20", "--seed", "3").stdout
    assert a == b and a.startswith("One day")
    again = run_slm("export", str(exported / "ckpt" / "exp" / "latest-rank0.pt"), "-o", folder, check=False)
    assert again.returncode == 1 and "already exists; pass --overwrite" in again.stderr


def test_eval_of_checkpoint_and_export_agree_with_a_direct_computation(exported, shards):
    import numpy as np

    ckpt = exported / "ckpt" / "exp" / "latest-rank0.pt"
    results = [json.loads(run_slm("eval", str(m), "-d", str(shards / "eval"), "--batch-size", "7").stdout)
               for m in (ckpt, exported / "hf")]
    assert {k: v for k, v in results[0].items() if k != "model"} == {k: v for k, v in results[1].items()
                                                                     if k != "model"}
    ids = torch.from_numpy(mds_tokens(shards / "eval").astype(np.int64))
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported / "hf").eval()
    with torch.no_grad():
        loss = hf(input_ids=ids, labels=ids).loss.item()
    assert results[0]["samples"] == len(ids)
    assert abs(results[0]["CrossEntropy"] - loss) < 1e-4
    assert abs(results[0]["Perplexity"] - np.exp(loss)) < 1e-3 * np.exp(loss)
    assert 0 < results[0]["Accuracy"] < 1 and 0 < results[0]["BitsPerByte"] < results[0]["CrossEntropy"]


def test_eval_refuses_data_from_another_tokenizer(exported, tmp_path, corpus):
    from slm.data.tokenizer import train_tokenizer

    train_tokenizer([["a different tokenizer altogether"]], 300).save_pretrained(tmp_path / "tok")
    run_slm("tokenize", "-i", str(corpus), "-f", "story", "-t", str(tmp_path / "tok"), "-l", "32",
            "--out-dir", str(tmp_path / "mds"))
    proc = run_slm("eval", str(exported / "hf"), "-d", str(tmp_path / "mds"), check=False)
    assert proc.returncode == 1 and f"not with the model's tokenizer {exported / 'hf'} (content hashes differ)" in \
        proc.stderr, proc.stderr


@pytest.mark.train
@pytest.mark.beside  # four models of 30m to 124m parameters: minutes, beside the main session
@pytest.mark.parametrize("name", ["llama-30m", "llama-120m", "mamba-95m", "gpt2-124m"])
def test_the_published_shapes_train_two_batches_and_export(name, shards, tmp_path):
    """The yamls of the sizes the field publishes (Pythia-70m's and 160m's shapes, Mamba-130m's, GPT-2 small) build,
    train 2 batches on the CPU and export to a folder transformers loads with the trained weights."""
    train(REPO / "yamls" / f"{name}.yaml", f"data.train.local={shards / 'train'}", f"data.eval.local={shards / 'eval'}",
          "max_duration=2ba", "global_batch_size=2", "eval_batches=1", "early_checkpoints=0", "save_interval=2ba",
          f"save_folder={tmp_path / 'ckpt' / '{run_name}'}")
    state = final_state(tmp_path / "ckpt" / name)
    assert state["timestamp"]["Timestamp"]["batch"] == 2
    run_slm("export", str(tmp_path / "ckpt" / name / "latest-rank0.pt"), "-o", str(tmp_path / "hf"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    trained = model_from_checkpoint(state, name)
    assert type(exported) is type(trained) and all(
        torch.equal(a, b) for a, b in zip(exported.state_dict().values(), trained.state_dict().values(), strict=True))
