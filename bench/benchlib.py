"""What the benchmarks share: generated data made with the `slm` command, and the machine they ran on."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from slm.data.loading import build_dataloader

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's `slm` and `composer` sit beside its python


def slm(*args: str) -> None:
    """Run the `slm` command; its output is shown only if it fails."""
    proc = subprocess.run([str(BIN / "slm"), *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"slm {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def make_data(root: Path, docs: int, vocab: int, seq_len: int) -> None:
    """Corpus -> tokenizer -> train (95%) / validation (5%) shards under root/mds, as a user makes them."""
    slm("corpus", "--out", str(root / "stories.jsonl"), "--num-docs", str(docs))
    slm("tokenizer", "-i", str(root / "stories.jsonl"), "-f", "story", "-v", str(vocab), "--out-dir", str(root / "tok"))
    for name, split in (("train", "train[:95%]"), ("validation", "train[95%:]")):
        slm("tokenize", "-i", str(root / "stories.jsonl"), "-f", "story", "-s", split, "-t", str(root / "tok"),
            "-l", str(seq_len), "--out-dir", str(root / "mds" / name))


TOKENS_A_DOC = 150  # about, of the generated stories


def docs_for(samples: int, seq_len: int) -> int:
    """Return how many generated stories give about `samples` train samples of `seq_len` tokens (2,000 at least)."""
    return max(2000, int(samples * seq_len / TOKENS_A_DOC * 1.2))


@contextmanager
def scratch_with_data(name: str, docs: int, vocab: int, seq_len: int) -> Iterator[Path]:
    """A temporary folder with generated data in it (`make_data`: tok/, mds/train, mds/validation), removed after."""
    root = Path(tempfile.mkdtemp(prefix=f"slm-bench-{name}-"))
    try:
        make_data(root, docs, vocab, seq_len)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(figures: dict, out: Path | None) -> None:
    """End a benchmark: say the machine it ran on (figures["machine"]) and write its figures to `out` (--json)."""
    print(f"machine: {figures['machine']}")
    if out:
        out.write_text(json.dumps(figures, indent=2) + "\n")


@contextmanager
def cpus_kept_busy(processes: int) -> Iterator[None]:
    """`processes` other processes spinning on the CPU for the duration: a loaded machine, as users run slm beside
    other jobs (bench/chaos.py --busy, pytest --busy)."""
    spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for proc in spinning:
            proc.kill()
            proc.wait()


def machine() -> str:
    """CPU model, cores, memory and GPU, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {gpu}; {platform.system()} {platform.release()}"


def time_loader(cfg, batch_size: int, batches: int, warmup: int = 0) -> float:
    """Seconds for slm's training data loader alone (its StreamingDataset and workers) to yield `batches`."""
    loader = iter(build_dataloader(cfg.data.train, cfg.data, batch_size, train=True).dataloader)
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return time.perf_counter() - start


def peaks_mib(command: list[str]) -> tuple[float, float]:
    """Run `command` to its end; its peak anonymous memory and peak resident set size, in MiB."""
    errors = tempfile.TemporaryFile()  # not a pipe: nobody reads it while the command runs
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
    status_file, anon = Path(f"/proc/{proc.pid}/status"), 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            anon = max(anon, next(int(line.split()[1]) for line in status_file.read_text().splitlines()
                                  if line.startswith("RssAnon:")))
        except (OSError, StopIteration):
            pass
        time.sleep(0.01)
    if os.waitstatus_to_exitcode(status):
        errors.seek(0)
        raise SystemExit(f"{' '.join(command)} failed:\n{errors.read().decode()[-2000:]}")
    return anon / 1024, usage.ru_maxrss / 1024  # both in KiB on Linux
