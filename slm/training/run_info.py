"""What a run is and where it ran: config, tokenizer, package versions, hardware, git commit, starts.

The `RunInfo` callback keeps this in every checkpoint (`state["callbacks"]["RunInfo"]`), so
`slm export` needs nothing but the checkpoint file, and writes it to `run.json` in the run
folder each time the run starts or resumes.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from slm.core.config import TrainConfig
from slm.core.paths import write_atomically
from slm.core.run_folder import STATE_FILE
from slm.training.loggers import MetricsFile

PACKAGES = ("slm", "torch", "mosaicml", "mosaicml-streaming", "transformers", "tokenizers", "datasets",
            "huggingface-hub", "wandb", "mambapy", "mamba-ssm")
PROJECT = Path(__file__).resolve().parents[2]  # slm/training/run_info.py


def _cpu_model() -> str:
    """Return the CPU's model name, from /proc/cpuinfo, else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """Return the project's commit (with `-dirty` if files differ from it), or None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PROJECT), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hosts() -> list[str]:
    """Gather the hostname of each node of the run, in node order (every process calls it: a collective)."""
    names = dist.all_gather_object(socket.gethostname())
    return list(dict.fromkeys(names))


def environment() -> dict[str, Any]:
    """Collect package versions, hardware, the hosts and the project's git commit (a collective: every process calls
    it)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"versions": versions, "git_commit": git_commit(), "host": socket.gethostname(), "hosts": hosts(),
            "hardware": {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
                         "gpu": gpus[0] if gpus else None, "gpu_count": len(gpus),
                         "processes": dist.get_world_size()}}


def record_state(folder: Path, state: str, **details: Any) -> None:
    """Record, on rank 0, how the run stands in its folder's run-state.json: running, finished, stopped or failed."""
    if dist.get_global_rank() == 0:
        record = {"state": state, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "host": socket.gethostname(), "pid": os.getpid(), **details}
        write_atomically(folder / STATE_FILE, json.dumps(record, indent=1) + "\n")


class RunInfo(Callback):
    """Run metadata in every checkpoint and in `run.json`; each start or resume appends to `starts`; a run
    branched off another run's checkpoint records it under `warm_start` (slm/training/warm_start.py)."""

    def __init__(self, cfg: TrainConfig, tokenizer: dict, parameters: int, metrics: MetricsFile,
                 warm_start: dict[str, Any] | None = None):
        self.folder, self.metrics = cfg.folder, metrics
        self.info: dict[str, Any] = {"run_name": cfg.run_name, "config": cfg.to_dict(), "tokenizer": tokenizer["name"],
                                     "tokenizer_hash": tokenizer["content_hash"], "parameters": parameters,
                                     "warm_start": warm_start, "starts": []}

    def fit_start(self, state: State, logger: Logger) -> None:
        start = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "batch": int(state.timestamp.batch), **environment()}
        self.info["starts"] = [s for s in self.info["starts"] if s["batch"] < start["batch"]] + [start]
        if dist.get_global_rank() == 0:
            write_atomically(self.folder / "run.json", json.dumps(self.info, indent=2) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {**self.info, "metrics": dict(self.metrics.latest)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The config of the run being resumed wins over the one it was saved with; its history is kept.
        self.info["starts"] = state.get("starts", [])
        self.info["warm_start"] = state.get("warm_start", self.info["warm_start"])  # where the run branched off
        self.metrics.latest = dict(state.get("metrics", {}))
