"""What the tests share besides fixtures: the `slm` command, tiny training configs, training (in this process
or others), checkpoint comparisons, tokenizer edits and the Hub double. conftest.py keeps the fixtures and hooks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from helpers.pytest_capture import capture_manager, run_in_this_process

REPO = Path(__file__).resolve().parents[2]
HUB_DOUBLE = REPO / "tests" / "hub_double"
HOOKS = REPO / "tests" / "hooks"  # on PYTHONPATH in every process a test starts (conftest.py)


def from_bench(name: str):
    """Import bench/NAME.py, an instrument the benchmarks and the tests share (bench/ is not on sys.path here)."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]
SLM = str(Path(sys.executable).parent / "slm")


# The stderr of every process the running test started through the helpers below, (label, text or a function
# giving it): conftest.py shows their tails when the test fails, for any reason, and empties it after each test.
OUTPUTS: list[tuple[str, str | Callable[[], str]]] = []
_LOGS: list[Path] = []  # the files behind them


def forget_outputs() -> None:
    """Forget the finished test's outputs and remove their files."""
    OUTPUTS.clear()
    for log in _LOGS:
        log.unlink(missing_ok=True)
    _LOGS.clear()


def shown_on_failure(cmd: list[str], stderr: str | Callable[[], str]) -> None:
    """Show `stderr` (or what the function gives then) with the report if the running test fails."""
    OUTPUTS.append((" ".join(map(str, cmd)), stderr))


def job_log(log: Path) -> Path:
    """`log`, a scheduler job's output file, shown with the report if the test fails (a wait that timed out
    included)."""
    shown_on_failure(["the job log", str(log)], lambda: log.read_text(errors="replace") if log.exists() else "")
    return log


class Started(subprocess.Popen):
    """A command started in the background by a test (cwd the repository, stdout discarded unless asked for): its
    stderr goes to a file, which the test reads as `stderr_text` (and `communicate` returns), and whose tail the
    test's report shows when the test fails, an exception before any assertion included."""

    def __init__(self, cmd: list[str], **kwargs):
        fd, name = tempfile.mkstemp(prefix="slm-test-stderr-", suffix=".txt")
        os.close(fd)
        self.log = Path(name)
        _LOGS.append(self.log)
        kwargs.setdefault("cwd", REPO)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        with open(self.log, "w") as log:
            super().__init__(cmd, stderr=log, text=True, **kwargs)
        shown_on_failure(cmd, lambda: self.stderr_text)

    @property
    def stderr_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def communicate(self, input=None, timeout=None) -> tuple[str | None, str]:
        out, _ = super().communicate(input, timeout)
        return out, self.stderr_text


def run_cmd(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` as the tests drive training (cwd the repository, output captured, 10 minutes at most),
    its stderr shown with the report if the test fails."""
    kwargs = {"cwd": REPO, "capture_output": True, "text": True, "timeout": 600, **kwargs}
    proc = subprocess.run(cmd, **kwargs)
    shown_on_failure(cmd, proc.stderr)
    return proc


def ranks_of(launcher: subprocess.Popen) -> dict[int, int]:
    """{global rank: pid} of the training processes `composer -n N` started (fewer while it starts them)."""
    ranks = {}
    try:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    except FileNotFoundError:
        children = None
    if children is None or launcher.poll() is not None:
        raise AssertionError(f"the launcher exited with status {launcher.wait()}")
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:  # a rank that just ended
            continue
        rank = next((int(v.split(b"=")[1]) for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[rank] = int(pid)
    return ranks


class Hold:
    """Holds a training run at the end of each of `batches`, its checkpoint written, in every process, until the
    test releases it (tests/hooks/sitecustomize.py): a point the run cannot leave before the test has acted, on an
    idle fast machine as on a loaded one. Give the run `env`; `wait` until it is held; act; `release`."""

    def __init__(self, folder: Path, *batches: int):
        self.folder, self.batches = folder, batches
        folder.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "SLM_TEST_HOLD": str(folder), "SLM_TEST_HOLD_AT": ",".join(map(str, batches))}

    def wait(self, proc: subprocess.Popen | None = None, processes: int = 1, batch: int | None = None,
             timeout: float = 300) -> None:
        """Until `processes` processes are held at `batch` (the first of the batches); an AssertionError naming
        the exit status if `proc` (a process, or a job with its `poll()` and `returncode`) ended first."""
        batch = self.batches[0] if batch is None else batch
        deadline = time.monotonic() + timeout
        while len(list(self.folder.glob(f"held-{batch}-*"))) < processes:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the run exited with status {proc.returncode} before batch {batch}'s end")
            if time.monotonic() > deadline:
                raise AssertionError(f"the run was not held at the end of batch {batch} within {timeout:.0f} s")
            time.sleep(0.01)

    def wait_signalled(self, batch: int | None = None, processes: int = 1, timeout: float = 120) -> None:
        """Until `processes` processes held at `batch` have received a signal: one a scheduler passes on arrives
        after the command that sent it returns (scancel, scontrol requeue), and released before it, the run goes on
        past the batches the test expects it to stop at."""
        batch = self.batches[0] if batch is None else batch
        deadline = time.monotonic() + timeout
        while len(list(self.folder.glob(f"signalled-{batch}-*"))) < processes:
            if time.monotonic() > deadline:
                raise AssertionError(f"no signal reached the run held at batch {batch} within {timeout:.0f} s")
            time.sleep(0.01)

    @property
    def job_env(self) -> dict[str, str]:
        """What a scheduler's job needs to be held (`env` of tests/clusters.py's `submit`): the hold's variables
        and the tests' hooks on PYTHONPATH."""
        return {k: self.env[k] for k in ("SLM_TEST_HOLD", "SLM_TEST_HOLD_AT", "PYTHONPATH")}

    def release(self, batch: int | None = None) -> None:
        (self.folder / f"release-{self.batches[0] if batch is None else batch}").touch()


def run_slm(*args: str, check: bool = True, own_process: bool = False) -> subprocess.CompletedProcess:
    """Run the real `slm` console command: its `main` in this process (seconds of start-up saved per command), as
    `train` does, unless asked not to or where its output could not be told apart."""
    capman = None if own_process or threading.current_thread() is not threading.main_thread() else capture_manager()
    if capman:
        from slm.cli import main

        proc = run_in_this_process(main, list(args), capman, Path.cwd(), "slm")
    else:
        proc = subprocess.run([SLM, *args], capture_output=True, text=True, timeout=300)
    shown_on_failure(["slm", *args], proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"slm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def mds_tokens(local: Path, remote: Path | None = None) -> np.ndarray:
    """Read every sample's tokens of an MDS folder (or remote, through `local` as cache) in order, with the stock
    Streaming reader. Its prefix is registered the way slm's readers do (slm/core/streaming_workarounds.py): a stock
    dataset opened here raced the slm runs of a session beside this one for the same prefix (FileExistsError)."""
    from streaming import StreamingDataset

    from slm.core.streaming_workarounds import streaming_datasets

    with streaming_datasets():
        ds = StreamingDataset(local=str(local), remote=None if remote is None else str(remote), shuffle=False,
                              batch_size=1)
        return np.stack([ds[i]["tokens"] for i in range(len(ds))])


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




def hub_double(root: Path, monkeypatch: pytest.MonkeyPatch):
    """The folder-backed HfApi double on `root`, in this process and in every subprocess started from here on."""
    sys.path.insert(0, str(HUB_DOUBLE))
    from folder_hub import FolderHfApi

    import slm.hub.client

    sys.path.remove(str(HUB_DOUBLE))
    api = FolderHfApi(root)
    monkeypatch.setattr(slm.hub.client, "HfApi", lambda *args, **kwargs: api)
    monkeypatch.setenv("SLM_TEST_HUB_ROOT", str(root))  # tests/hooks installs it in every process started
    return api


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


RUNNING: list[pytest.Item] = []  # the test now running (conftest's autouse fixture keeps it)


def require_train_mark() -> None:
    """Fail a test that trains without the `train` mark, which keeps it out of `make test-fast`."""
    if RUNNING and RUNNING[0].get_closest_marker("train") is None:
        raise AssertionError(f"{RUNNING[0].nodeid} trains a model but is not marked @pytest.mark.train")


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
    capman = capture_manager() if here else None
    if capman:
        require_train_mark()
        from slm.train import main

        proc = run_in_this_process(main, [str(config), *overrides], capman, REPO, "slm/train.py")
    else:
        proc = subprocess.run(train_cmd(config, *overrides, procs=procs), capture_output=True, text=True,
                              timeout=600, cwd=REPO)
    shown_on_failure(proc.args, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train_stderr(config: Path, *overrides: str | Path, status: int = 0) -> str:
    """`train` ending with exit status `status`: its stderr."""
    proc = train(config, *map(str, overrides), check=False)
    assert proc.returncode == status, proc.stderr[-3000:]
    return proc.stderr


def final_state(folder: Path) -> dict:
    """The state in the checkpoint `latest-rank0.pt` points at."""
    from slm.core.trust import unpickle_checkpoint

    return unpickle_checkpoint(folder / "latest-rank0.pt")["state"]


def newest_loadable(folder: Path) -> int:
    """The newest checkpoint slm can read (before the final run rewrites anything)."""
    from slm.core.trust import unpickle_checkpoint

    for path in sorted(folder.glob("ep0-ba*-rank0.pt"), key=lambda p: -int(p.name.split("-ba")[1].split("-")[0])):
        try:
            return unpickle_checkpoint(path)["state"]["timestamp"]["Timestamp"]["batch"]
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
    match = re.search(r"slm train: \S+: (?:resumed at|starting at) batch (\d+)", proc.stderr)
    assert match, proc.stderr[-2000:]
    return int(match.group(1))


class Payload:
    """What an attacker plants in a pickle: unpickling it creates the file `marker` (any code could run instead)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant_payload(checkpoint: Path, out: Path, marker: Path) -> Path:
    """A copy of a real checkpoint at `out` whose run record carries a `Payload` creating `marker`, as the owner of
    a published repo could make it; the original file is read as slm reads its own."""
    import torch

    from slm.core.trust import unpickle_checkpoint

    state = unpickle_checkpoint(checkpoint)
    state["state"]["callbacks"]["RunInfo"]["note"] = Payload(marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out
