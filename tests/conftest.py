"""Shared fixtures: a small story corpus and a tokenizer trained on it, made once per session."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

# No network at test time, ever: fail fast instead of waiting on a timeout.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "true"
# `datasets` reads its cache location once, at import (test modules import it at collection time):
# keep its Arrow cache out of the user's home.
_cache = tempfile.mkdtemp(prefix="slm-test-datasets-")
os.environ["HF_DATASETS_CACHE"] = _cache
atexit.register(shutil.rmtree, _cache, ignore_errors=True)

SLM = str(Path(sys.executable).parent / "slm")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slm.corpus import write_corpus

    path = tmp_path_factory.mktemp("corpus") / "stories.jsonl"
    write_corpus(path, num_docs=400, seed=1)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    run_slm("tokenizer", "-i", str(corpus), "-f", "story", "-v", "512", "--out-dir", str(out))
    return out


def run_slm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `slm` console command."""
    proc = subprocess.run([SLM, *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"slm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def edited_tokenizer(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the tokenizer folder `src` at `dst`, its tokenizer.json changed in place by `edit`."""
    import json

    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    edit(spec)
    (dst / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return dst


def old_merges(spec: dict) -> None:
    """Merges as tokenizers < 0.20 wrote them: "a b" strings instead of ["a", "b"] pairs."""
    spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]


def bos_template(spec: dict) -> None:
    """A post-processor adding <bos>, as newer transformers add one when they load a folder."""
    bos = {"SpecialToken": {"id": "<bos>", "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [0], "tokens": ["<bos>"]}}}


def swap_a_b(spec: dict) -> None:
    """The same vocabulary but "a" and "b" trading ids."""
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]


REPO = Path(__file__).resolve().parent.parent
HUB_DOUBLE = Path(__file__).resolve().parent / "hub_double"
if Path(sys.prefix).resolve().parent == REPO:  # the job scripts activate the venv (stack) of this session
    os.environ["SLM_VENV"] = Path(sys.prefix).name


def hub_double(root: Path, monkeypatch: pytest.MonkeyPatch):
    """The folder-backed HfApi double on `root`, in this process and in every subprocess started from here on."""
    sys.path.insert(0, str(HUB_DOUBLE))
    from folder_hub import FolderHfApi

    import slm.hub

    sys.path.remove(str(HUB_DOUBLE))
    api = FolderHfApi(root)
    monkeypatch.setattr(slm.hub, "HfApi", lambda *args, **kwargs: api)
    monkeypatch.setenv("SLM_TEST_HUB_ROOT", str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HUB_DOUBLE), os.environ.get("PYTHONPATH")])))
    return api


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The folder-backed HfApi double, in this process and in every subprocess the test starts."""
    return hub_double(tmp_path / "hub", monkeypatch)


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory, corpus: Path, tokenizer_dir: Path) -> Path:
    """Train and eval MDS folders (seq_len 64) made from the session corpus."""
    root = tmp_path_factory.mktemp("shards")
    for name, split in (("train", "train[:90%]"), ("eval", "train[90%:]")):
        run_slm("tokenize", "-i", str(corpus), "-f", "story", "-s", split, "-t", str(tokenizer_dir), "-l", "64",
                "--out-dir", str(root / name))
    return root


def write_yaml(path: Path, shards: Path, base: str = "demo-llama.yaml", **model) -> Path:
    """A tiny training config: 16 batches of 8 samples, checkpoints every 4, a one-layer model."""
    arch = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_key_value_heads": 1, "num_hidden_layers": 1, "max_position_embeddings": 64}
    if "mamba" in base:
        arch = {"vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 1}
    arch.update(model)
    lines = [f"base: {REPO / 'yamls' / base}", "max_duration: 16ba", "global_batch_size: 8", "save_interval: 4ba",
             "early_checkpoints: 2", "eval_interval: 8ba", "eval_batches: 2", "log_interval: 4ba",
             f"save_folder: {path.parent}/ckpt/{{run_name}}", "scheduler: {warmup: 4ba}",
             f"data: {{train: {{local: {shards / 'train'}}}, eval: {{local: {shards / 'eval'}}}}}", "model:"]
    lines += [f"  {k}: {v}" for k, v in arch.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--busy", type=int, default=0, metavar="N",
                     help="keep N other processes spinning on the CPU for the whole session (the interruption "
                          "tests under load, as on a shared machine)")


@pytest.fixture(scope="session", autouse=True)
def _busy_cpus(request: pytest.FixtureRequest):
    busy = request.config.getoption("--busy")
    if not busy:
        yield
        return
    sys.path.insert(0, str(REPO / "bench"))
    from benchlib import cpus_kept_busy

    sys.path.remove(str(REPO / "bench"))
    with cpus_kept_busy(busy):
        yield


_running: list[pytest.Item] = []  # the test now running


@pytest.fixture(autouse=True)
def _note_running_test(request: pytest.FixtureRequest):
    _running[:] = [request.node]
    yield
    _running.clear()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on the clusters is a cluster test (and trains): none can slip into `make test-fast`."""
    for item in items:
        if {"slurm", "sge"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)
            item.add_marker(pytest.mark.train)


def require_train_mark() -> None:
    """Fail a test that trains without the `train` mark, which keeps it out of `make test-fast`."""
    if _running and _running[0].get_closest_marker("train") is None:
        raise AssertionError(f"{_running[0].nodeid} trains a model but is not marked @pytest.mark.train")


def train_cmd(config: Path, *overrides: str, procs: int = 1) -> list[str]:
    """`python slm/train.py ...`, or `composer -n procs slm/train.py ...`."""
    require_train_mark()
    script = str(REPO / "slm" / "train.py")
    if procs > 1:
        return [str(Path(sys.executable).parent / "composer"), "-n", str(procs), script, str(config), *overrides]
    return [sys.executable, script, str(config), *overrides]


def train(config: Path, *overrides: str, procs: int = 1, check: bool = True,
          own_process: bool = False) -> subprocess.CompletedProcess:
    """`python slm/train.py CONFIG OVERRIDES` (or `composer -n procs ...`), run to its end: its exit status and
    output. A single process runs in this one, through slm/train.py's main (seconds of start-up saved per run),
    unless asked not to, or from a thread or with capture off (-s), where its output could not be told apart."""
    here = procs == 1 and not own_process and threading.current_thread() is threading.main_thread()
    capman = _capture() if here else None
    if capman:
        proc = _train_in_this_process([str(config), *overrides], capman)
    else:
        proc = subprocess.run(train_cmd(config, *overrides, procs=procs), capture_output=True, text=True,
                              timeout=600, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


_config: list[pytest.Config] = []


def pytest_configure(config: pytest.Config) -> None:
    _config[:] = [config]


def _capture():
    """pytest's capture manager, while its own capture (not a test's capfd or capsys) takes this process's output."""
    capman = _config[0].pluginmanager.getplugin("capturemanager") if _config else None
    return capman if capman is not None and capman.is_capturing() == "global" and not capman._capture_fixture else None


def _train_in_this_process(argv: list[str], capman) -> subprocess.CompletedProcess:
    """slm/train.py's main here, as a process would run it: from the repo root, its output and warnings captured."""
    from slm.train import main

    require_train_mark()
    capman.read_global_capture()  # what came before belongs to the test
    cwd = os.getcwd()
    os.chdir(REPO)
    # A process's warnings reach stderr through logging's last resort; pytest's own handlers stand in its way here.
    logging.root.addHandler(logging.lastResort)
    try:
        status = main(argv)
    except SystemExit as e:  # argparse
        status = e.code if isinstance(e.code, int) else 1
    finally:
        logging.root.removeHandler(logging.lastResort)
        os.chdir(cwd)
        out, err = capman.read_global_capture()
    return subprocess.CompletedProcess(["slm/train.py", *argv], status, out, err)


def train_stderr(config: Path, *overrides: str | Path, status: int = 0) -> str:
    """`train` ending with exit status `status`: its stderr."""
    proc = train(config, *map(str, overrides), check=False)
    assert proc.returncode == status, proc.stderr[-3000:]
    return proc.stderr


def final_state(folder: Path) -> dict:
    """The state in the checkpoint `latest-rank0.pt` points at."""
    import torch

    return torch.load(folder / "latest-rank0.pt", weights_only=False, map_location="cpu")["state"]


def newest_loadable(folder: Path) -> int:
    """The newest checkpoint torch.load can read (before the final run rewrites anything)."""
    import torch

    for path in sorted(folder.glob("ep0-ba*-rank0.pt"), key=lambda p: -int(p.name.split("-ba")[1].split("-")[0])):
        try:
            return torch.load(path, weights_only=False, map_location="cpu")["state"]["timestamp"]["Timestamp"]["batch"]
        except Exception:
            continue
    return 0


def assert_bitwise_equal(a: dict, b: dict) -> None:
    """Every model tensor and every optimizer tensor identical, at the same batch."""
    import torch

    assert a["timestamp"]["Timestamp"]["batch"] == b["timestamp"]["Timestamp"]["batch"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"model tensor {key} differs"
    opt_a, opt_b = a["optimizers"]["AdamW"]["state"], b["optimizers"]["AdamW"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for param in opt_a:
        for name in opt_a[param]:
            assert torch.equal(opt_a[param][name], opt_b[param][name]), f"optimizer {param}/{name} differs"


def resumed_at(proc: subprocess.CompletedProcess) -> int:
    """The batch a training run started from, as it reports it."""
    import re

    match = re.search(r"slm train: \S+: (?:resumed at|starting at) batch (\d+)", proc.stderr)
    assert match, proc.stderr[-2000:]
    return int(match.group(1))


def _cluster(kind: str, tmp_path_factory: pytest.TempPathFactory):
    """Start a one-node cluster of `kind` for the session; skip only when the schedulers cannot be installed."""
    from clusters import SGE, Slurm, install_schedulers

    if not (REPO / os.environ.get("SLM_VENV", ".venv") / "bin" / "python").exists():
        pytest.skip("the job scripts activate a venv of the repository's (make venv), and this session runs in "
                    f"none: {sys.prefix}")
    reason = install_schedulers()
    if reason:
        pytest.skip(reason)
    cluster = (Slurm if kind == "slurm" else SGE)(tmp_path_factory.mktemp(kind))
    reason = cluster.usable() if kind == "sge" else None
    if reason:
        pytest.skip(reason)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    yield from _cluster("slurm", tmp_path_factory)


@pytest.fixture(scope="session")
def sge(tmp_path_factory: pytest.TempPathFactory):
    yield from _cluster("sge", tmp_path_factory)
