"""The fixtures and hooks: a small story corpus, a tokenizer and shards made from it once per session, the Hub
double, the one-node clusters, --busy; the environment every test runs in. The helpers are in tests/helpers."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import HOOKS, OUTPUTS, REPO, RUNNING, forget_outputs, hub_double, pytest_capture, run_slm

# No network at test time, ever: fail fast instead of waiting on a timeout.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "true"
# What tests put into the processes they start (the Hub double, batch recording, holding a run at a batch), each
# where the test's environment asks for it: tests/hooks/sitecustomize.py.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOKS), os.environ.get("PYTHONPATH")]))
# `datasets` reads its cache location once, at import (test modules import it at collection time):
# keep its Arrow cache out of the user's home.
_cache = tempfile.mkdtemp(prefix="slm-test-datasets-")
os.environ["HF_DATASETS_CACHE"] = _cache
atexit.register(shutil.rmtree, _cache, ignore_errors=True)
if Path(sys.prefix).resolve().parent == REPO:  # the job scripts activate the venv (stack) of this session
    os.environ["SLM_VENV"] = Path(sys.prefix).name

@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slm.data.corpus import write_corpus

    path = tmp_path_factory.mktemp("corpus") / "stories.jsonl"
    write_corpus(path, num_docs=400, seed=1)
    return path


@pytest.fixture(scope="session")
def foreign_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A corpus no one here wrote: Python's own reference documentation (`pydoc_data.topics`, shipped with every
    CPython), a document per topic in name order, as 4 jsonl files (field 'text'); returns their glob."""
    import json
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("foreign")
    names = sorted(topics)
    for i in range(4):
        chunk = names[len(names) * i // 4:len(names) * (i + 1) // 4]
        (root / f"topics-{i}.jsonl").write_text("".join(json.dumps({"text": topics[n]}) + "\n" for n in chunk))
    return str(root / "topics-*.jsonl")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    run_slm("tokenizer", "-i", str(corpus), "-f", "story", "-v", "512", "--out-dir", str(out))
    return out


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


@pytest.fixture(autouse=True)
def _note_running_test(request: pytest.FixtureRequest):
    RUNNING[:] = [request.node]
    yield
    RUNNING.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test's report shows the stderr tail of every process it started through the helpers (the last
    few); they are forgotten, and their files removed, once the test is over."""
    report = yield
    if report.failed:
        for label, stderr in OUTPUTS[-4:]:
            text = stderr() if callable(stderr) else stderr
            report.sections.append((f"stderr of {label[:200]}", text[-3000:] or "(empty)"))
    if call.when == "teardown":
        forget_outputs()
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on the clusters is a cluster test (and trains): none can slip into `make test-fast`. One on the two
    test hosts is a `hosts` test (and trains)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if {"slurm", "sge"} & fixtures:
            item.add_marker(pytest.mark.cluster)
        if "two_hosts" in fixtures:
            item.add_marker(pytest.mark.hosts)
        if {"slurm", "sge", "two_hosts"} & fixtures:
            item.add_marker(pytest.mark.train)


def pytest_configure(config: pytest.Config) -> None:
    pytest_capture.CONFIG[:] = [config]


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


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory):
    """The two test hosts with Slurm and SGE across them (tests/clusters.py `TwoHosts`) for their test module (torn
    down before any test after it); the repository and the session's temporary folders shared between them.
    Afterwards no namespace, link or daemon of theirs is left."""
    from clusters import TwoHosts, install_schedulers

    reason = install_schedulers() or TwoHosts.usable()  # installing brings mungekey, which usable() looks for
    if reason and os.environ.get("SLM_HOSTS_REQUIRED"):  # make test-hosts: asked for, so not run is a failure
        pytest.fail(f"the two-host tests cannot run here: {reason}")
    if reason:
        pytest.skip(reason)
    # Directly in /tmp, not $TMPDIR (make test's sessions have private ones): munged and SGE's daemons run
    # as their own users and must reach their folders in it.
    root = Path(tempfile.mkdtemp(prefix="slm-hosts-", dir="/tmp"))
    root.rmdir()  # made by tests/two_hosts.sh up
    hosts = TwoHosts(root, [REPO, tmp_path_factory.getbasetemp()])
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()
        assert hosts.leftovers() == [], hosts.leftovers()
