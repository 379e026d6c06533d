"""Shared fixtures: a small story corpus and a tokenizer trained on it, made once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
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
