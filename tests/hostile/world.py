"""The honest world the hostile variants are made from, and the outside tree they must never reach.

`build_world` makes, with slm's own commands, one honest instance of every kind of input slm reads from elsewhere,
in one folder whose paths are all relative (each variant is a copy of it, and its commands run inside the copy):

    tiny.yaml, publish.yaml   configs of yours (trusted): a one-layer llama on shards/, the second publishing
    shards/train, shards/eval a shard folder (index.json, a zstd shard, slm-dataset.json, slm-documents.npz)
    stories.jsonl             a copy of the corpus they were tokenized from (which their record names)
    ckpt/run/                 a run folder: 8 batches, checkpoints 1, 2, 4, 8, metrics.jsonl, run.json,
                              config.yaml, run-state.json, the manifest, and an upload still queued in .hub-pending/
    ckpt.pt                   a checkpoint file (batch 8)
    export/                   `slm export` of it
    hub/                      the Hub double: model repo org/run (checkpoints on main, export branches ba1..ba8)
    tables/                   tables slm reads back: `slm logprobs` tables, an `slm eval --out` table

`build_outside` makes the tree outside every given folder: a canary (a JSON-lines file holding MARKER, which parses
as a dataset, a metrics row and a record), a folder of canaries, a place where nothing may be created, and a home
with the secrets a researcher has: the Hub login's token file, a netrc with a W&B password, token variables.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from helpers import HOOKS, REPO, SLM

MARKER = "CANARY-7f3c1e-outside-content"
SECRETS = {  # a researcher's environment: tokens slm must never write or show
    "PGPASSWORD": "pgHostileHarnessPass0002",
    "WANDB_API_KEY": "wandbHostileHarnessKey00000000000003",
    "GITHUB_TOKEN": "ghp_HostileHarnessToken0004",
    "OPENAI_API_KEY": "sk-HostileHarnessKey0005",
    "AWS_SECRET_ACCESS_KEY": "awsHostileHarnessSecret0006",
    "HUGGING_FACE_HUB_TOKEN": "hf_HostileHarnessOldName0007",
}
LOGIN_TOKEN = "hf_HostileHarnessLoginToken0001"  # the Hub login's token file (huggingface-cli login)
NETRC_PASSWORD = "netrcHostileHarnessPassword0008"  # ~/.netrc, where `wandb login` keeps its key
REPO_ID = "org/run"


@dataclass
class Outside:
    """The tree outside every folder a command is given: nothing in it may change, be shown or be created."""

    root: Path

    @property
    def canary(self) -> Path:
        return self.root / "canary.jsonl"

    @property
    def canary_dir(self) -> Path:
        return self.root / "canary-dir"

    @property
    def target(self) -> Path:
        """Where a climbing or absolute path a variant plants leads: nothing may appear in it."""
        return self.root / "target"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def token_file(self) -> Path:
        return self.home / ".cache" / "huggingface" / "token"

    @property
    def netrc(self) -> Path:
        return self.home / ".netrc"

    @property
    def marker(self) -> Path:
        """The file a pickled payload creates when it runs."""
        return self.target / "PAYLOAD-RAN"

    def secrets(self) -> list[str]:
        return [*SECRETS.values(), LOGIN_TOKEN, NETRC_PASSWORD]

    def environment(self) -> dict[str, str]:
        """The environment of every command: this home, its token file and netrc, the token variables."""
        return {**SECRETS, "HOME": str(self.home), "HF_HOME": str(self.token_file.parent), "NETRC": str(self.netrc)}


def command_environment(root: Path, outside: Outside) -> dict[str, str]:
    """The environment every command of the harness runs in: the outside home and its secrets (the Hub login's token
    from its token file, not HF_TOKEN), no network, and the caches of the libraries in `root`, not in that home."""
    caches = root / "caches"
    env = {**os.environ, **outside.environment(), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "SLM_TEST_HUB_ROOT": "",
           "HF_HUB_CACHE": str(caches / "hub"), "HF_DATASETS_CACHE": str(caches / "datasets"),
           "HF_MODULES_CACHE": str(caches / "modules"),
           "XDG_CACHE_HOME": str(caches / "xdg"), "XDG_CONFIG_HOME": str(caches / "config"),
           "MPLCONFIGDIR": str(caches / "matplotlib"), "SLM_CACHE": str(caches / "slm"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOKS), os.environ.get("PYTHONPATH")]))}
    env.pop("HF_TOKEN", None)
    return env


def build_outside(root: Path) -> Outside:
    outside = Outside(root)
    lines = [json.dumps({"story": f"{MARKER} story {i}", "text": f"{MARKER} text {i}", "batch": i + 1,
                         "tokens": i + 1, "run_name": MARKER, "name": MARKER}) for i in range(1000)]
    outside.canary.parent.mkdir(parents=True, exist_ok=True)
    outside.canary.write_text("\n".join(lines) + "\n")
    outside.canary_dir.mkdir()
    for name in ("canary.jsonl", "tokenizer.json", "config.json", "index.json", "run.json", "metrics.jsonl"):
        shutil.copyfile(outside.canary, outside.canary_dir / name)
    outside.target.mkdir()
    outside.token_file.parent.mkdir(parents=True)
    outside.token_file.write_text(LOGIN_TOKEN)
    outside.netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {NETRC_PASSWORD}\n")
    outside.netrc.chmod(0o600)
    return outside


def _yaml(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def build_world(root: Path, shards: Path, corpus: Path, outside: Outside) -> Path:
    """Make the honest world in `root` with slm's own commands (each a process of its own, from `root`) from the
    tests' shards and the corpus they were tokenized from."""
    root.mkdir(parents=True)
    for split in ("train", "eval"):
        shutil.copytree(shards / split, root / "shards" / split)
    shutil.copyfile(corpus, root / "stories.jsonl")
    _yaml(root / "tiny.yaml", f"base: {REPO / 'yamls' / 'demo-llama.yaml'}", "run_name: run", "max_duration: 8ba",
          "global_batch_size: 8", "save_interval: 4ba", "early_checkpoints: 2", "eval_interval: 8ba",
          "eval_batches: 1", "log_interval: 2ba", "save_folder: ckpt/{run_name}",
          "scheduler: {name: constant, warmup: 2ba}",
          "data: {train: {local: shards/train}, eval: {local: shards/eval}}",
          "model: {vocab_size: 512, hidden_size: 32, intermediate_size: 64, num_attention_heads: 2, "
          "num_key_value_heads: 1, num_hidden_layers: 1, max_position_embeddings: 64}")
    _yaml(root / "publish.yaml", "base: tiny.yaml", f"hub: {{repo: {REPO_ID}, export: true}}")
    _yaml(root / "shards.yaml", "base: tiny.yaml", "data: {train: {local: shards/eval}}")
    _yaml(root / "pretrained.yaml", "run_name: pretrained", "max_duration: 1ba", "global_batch_size: 8",
          "save_folder: ckpt/{run_name}", "eval_interval: 1ba", "eval_batches: 1", "save_interval: 1ba",
          "early_checkpoints: 0", "data: {train: {local: shards/train}, eval: {local: shards/eval}}",
          "model: {pretrained: export}")
    env = {**command_environment(root.parent, outside), "SLM_TEST_HUB_ROOT": str(root / "hub")}

    def run(*cmd: str) -> None:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"building the hostile world: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")

    run(sys.executable, str(REPO / "slm" / "train.py"), "publish.yaml")
    shutil.copyfile(root / "ckpt" / "run" / "ep0-ba8-rank0.pt", root / "ckpt.pt")
    run(SLM, "export", "ckpt.pt", "--out-dir", "export")
    run(SLM, "logprobs", "ckpt/run", "--data", "shards/eval", "--out-dir", "tables/logprobs", "--max-samples", "8")
    run(SLM, "eval", "ckpt/run", "--data", "shards/eval", "--out", "tables/eval.parquet", "--max-batches", "1")
    _queue_an_upload(root / "ckpt" / "run")
    return root


def _queue_an_upload(folder: Path) -> None:
    """Leave the newest checkpoint in the upload queue, as a run killed before its upload does."""
    from slm.hub.manifest import weights_record

    pending = folder / ".hub-pending"
    pending.mkdir(exist_ok=True)
    newest = folder / "ep0-ba8-rank0.pt"
    (pending / f"{newest.name}.json").write_text(json.dumps(weights_record(newest)) + "\n")
    shutil.copyfile(newest, pending / newest.name)
