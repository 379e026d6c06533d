"""The three entry points (`slm`, `slm/train.py`, `python -m slm.cluster.launch`) share one error path: one line and
exit 1, or with --debug the full traceback, the cause included, before that line. And `slm/train.py` run as a script
does not leave slm/ on sys.path. `make data` makes what the suite's yamls train on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slm.cli import main as slm_main
from slm.cluster.launch import main as launch_main
from slm.train import main as train_main

from helpers import REPO, final_state, train


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


@pytest.fixture
def bad_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"batch": 1, "loss": \n')
    return tmp_path


@pytest.fixture
def malformed_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("max_duration: [16ba\n")
    return tmp_path / "bad.yaml"


@pytest.mark.parametrize("debug", [False, True])
def test_slm_keeps_the_cause(bad_metrics, tmp_path, capsys, debug):
    code = slm_main(["plot", str(bad_metrics), "--out", str(tmp_path / "x.png"), *(["--debug"] if debug else [])])
    err = capsys.readouterr().err
    assert code == 1 and len(error_lines(err)) == 1 and "line 1 is not valid JSON" in err.splitlines()[-1]
    assert ("Traceback" in err and "JSONDecodeError" in err and "direct cause" in err) == debug


@pytest.mark.parametrize("debug", [False, True])
def test_train_keeps_the_cause(malformed_yaml, capsys, debug):
    code = train_main([str(malformed_yaml), *(["--debug"] if debug else [])])
    err = capsys.readouterr().err
    assert code == 1 and err.splitlines()[-1].startswith(f"slm train: error: cannot parse {malformed_yaml}")
    assert ("Traceback" in err and "yaml.parser.ParserError" in err and "direct cause" in err) == debug


@pytest.mark.parametrize("debug", [False, True])
def test_launch_shares_the_error_path(monkeypatch, capsys, debug):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code = launch_main([*(["--debug"] if debug else []), "--print", "slm/train.py", "yamls/demo-llama.yaml"])
    err = capsys.readouterr().err
    assert code == 1 and err.splitlines()[-1] == "slm launch: error: SLURM_JOB_NODELIST is empty: cannot tell the " \
                                                 "master node"
    assert ("Traceback" in err) == debug


def test_an_unexpected_error_is_one_line_that_points_at_debug(tmp_path, capsys, monkeypatch):
    import slm.analysis.plot

    def trip(folder):
        raise RuntimeError("a bug of slm's own")

    monkeypatch.setattr(slm.analysis.plot, "read_run", trip)
    code = slm_main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].endswith("(rerun with --debug for the traceback)")


def test_train_script_does_not_leave_its_folder_on_sys_path():
    """Started as `python slm/train.py`, Python puts slm/ first on sys.path; the script takes it off before it
    imports anything, so `import evaluate` cannot find slm/analysis/evaluate.py."""
    code = (f"import runpy, sys, importlib.util\n"
            f"sys.argv = ['slm/train.py', '--help']\n"
            f"sys.path.insert(0, {str(REPO / 'slm')!r})  # what the interpreter does for a script\n"
            f"try:\n    runpy.run_path({str(REPO / 'slm' / 'train.py')!r}, run_name='__main__')\n"
            f"except SystemExit:\n    pass\n"
            f"assert {str(REPO / 'slm')!r} not in sys.path, sys.path\n"
            f"spec = importlib.util.find_spec('evaluate')\n"
            f"assert spec is None or 'slm' not in spec.origin, spec.origin\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: slm/train.py" in proc.stdout


@pytest.mark.train
def test_make_data_makes_what_the_suite_yamls_train_on(tmp_path):
    """The real `make data` (1,000 stories into a temp folder instead of 20,000 into data/) makes the folders
    yamls/base.yaml names with the suite's tokenizer settings, and a second `make data` does nothing; mamba-100k.yaml
    trains on them (2 batches of 8 instead of 256, for time)."""
    data, tokenizer, stamp = tmp_path / "data", tmp_path / "data" / "tokenizer", tmp_path / "installed"
    stamp.touch()  # the venv running these tests: nothing for make to install
    make = ["make", "--no-print-directory", "-C", str(REPO), "data", f"DATA={data}", f"TOKENIZER={tokenizer}",
            "NUM_DOCS=1000", f"BIN={Path(sys.executable).parent}", f"STAMP={stamp}"]
    first = subprocess.run(make, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    for split in ("train", "validation"):
        meta = json.loads((data / "mds" / split / "slm-dataset.json").read_text())
        assert meta["seq_len"] == 512 and meta["tokenizer"]["name"] == str(tokenizer), meta
    assert "not 4,096" in first.stderr  # asked for the suite's vocabulary (the corpus gives fewer tokens)
    again = subprocess.run(make, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "Nothing to be done for 'data'" in again.stdout, again.stdout + again.stderr

    base = (REPO / "yamls" / "base.yaml").read_text()
    assert "local: data/mds/train" in base and "local: data/mds/validation" in base and "vocab_size: 4096" in base
    train(REPO / "yamls" / "mamba-100k.yaml", f"data.train.local={data / 'mds' / 'train'}",
          f"data.eval.local={data / 'mds' / 'validation'}", "max_duration=2ba", "global_batch_size=8", "eval_batches=1",
          f"save_folder={tmp_path / 'ckpt' / '{run_name}'}")
    assert final_state(tmp_path / "ckpt" / "mamba-100k")["timestamp"]["Timestamp"]["batch"] == 2
