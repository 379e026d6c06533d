"""`slm status`: where each run of a suite stands, from its run folder alone.

slm/train.py records each start's outcome in the run folder's `run-state.json` (rank 0): `running`
(with host and pid) when training starts, then `finished`, `stopped` (a scheduler's signal or Ctrl-C,
checkpoint saved) or `failed` (with the error's line). A run still marked running whose process is
gone from this host was killed (SIGKILL, a node lost): the next start resumes it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slm.core.config import load_config, load_saved_config
from slm.core.errors import SlmError
from slm.core.foreign import read_json
from slm.core.run_folder import (
    STATE_FILE,
    check_run_state,
    checked_run_folder,
    checkpoints,
    is_complete,
    read_metrics,
    read_run_record,
)

TRAIN_LOSS, EVAL_LOSS = "loss/train/total", "metrics/eval/CrossEntropy"


@dataclass
class RunStatus:
    """Where one run stands: `slm status`'s row."""
    run: str
    folder: str
    state: str  # not started, running, finished, stopped, failed, killed, unknown
    detail: str = ""
    model: str | None = None
    parameters: int | None = None
    batch: int | None = None
    max_duration: str | None = None
    tokens: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    checkpoint: str | None = None
    checkpoint_age_s: float | None = None
    hub_pending: int = 0


def _model(model: dict) -> str | None:
    """Return the last dotted part of the model a `model` config names (`class`, else `pretrained`); None if neither."""
    name = model.get("class") or model.get("pretrained")
    return str(name).rsplit(".", 1)[-1] if name else None


def _alive(pid: int) -> bool:
    """Return whether process `pid` exists on this host (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _state(folder: Path, has_checkpoints: bool) -> tuple[str, str]:
    """Return the run's (state, detail) from its run-state.json: `killed` where a run marked running has no process
    left on this host; without the file, `unknown` if it has checkpoints, else `not started`."""
    try:
        record = check_run_state(read_json(folder / STATE_FILE, "run state"), str(folder / STATE_FILE))
    except FileNotFoundError:
        return ("unknown", f"no {STATE_FILE} (written by slm since it reports states)") if has_checkpoints else \
            ("not started", "")
    state, since = record["state"], record.get("time", "?")
    if state == "running":
        if record.get("host") != socket.gethostname():
            return "running", f"on {record.get('host')} (pid {record.get('pid')}) since {since}, as far as known here"
        if record.get("pid") is None or not _alive(record["pid"]):
            return "killed", f"its process ({record.get('pid')}) is gone, no exit recorded: the same command resumes it"
        return "running", f"pid {record['pid']} since {since}"
    return state, f"{record.get('detail', '')} ({since})".strip()


def run_status(target: Path) -> RunStatus:
    """Return the status of a run folder, or of the run a training yaml would make."""
    if target.is_file():
        cfg = load_config(target)
        folder, name, model, duration = cfg.folder, cfg.run_name, _model(cfg.model), cfg.max_duration
        checked_run_folder(folder)
    elif target.is_dir():
        folder, name, model, duration = checked_run_folder(target), target.name, None, None
        if (target / "config.yaml").exists():
            cfg = load_saved_config(target / "config.yaml")
            name, model, duration = cfg.run_name, _model(cfg.model), cfg.max_duration
    else:
        raise SlmError(f"{target}: no such run folder or config yaml")
    found = {b: p for b, p in checkpoints(folder).items() if is_complete(p)}
    state, detail = _state(folder, bool(found))
    status = RunStatus(name, str(folder), state, detail, model, max_duration=duration)
    status.parameters = (read_run_record(folder) or {}).get("parameters")
    rows = read_metrics(folder)
    if rows:
        status.batch, status.tokens = rows[-1].get("batch"), rows[-1].get("tokens")
        status.train_loss = next((r[TRAIN_LOSS] for r in reversed(rows) if TRAIN_LOSS in r), None)
        status.eval_loss = next((r[EVAL_LOSS] for r in reversed(rows) if EVAL_LOSS in r), None)
    if found:
        newest = found[max(found)]
        status.checkpoint, status.checkpoint_age_s = newest.name, time.time() - newest.stat().st_mtime
    pending = folder / ".hub-pending"
    status.hub_pending = sum(1 for _ in pending.iterdir()) if pending.is_dir() else 0
    return status


def _age(seconds: float | None) -> str:
    """Return `seconds` as the age column shows it, in the largest of d, h, min and s it reaches; "-" for None."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def format_status(rows: list[RunStatus], as_json: bool = False) -> str:
    """Return the rows as a table, or as JSON."""
    if as_json:
        return json.dumps([asdict(r) for r in rows], indent=1)

    def number(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [f"{'run':<18} {'model':<18} {'params':>9} {'batch':>14} {'tokens':>12} {'train':>7} {'eval':>7} "
             f"{'newest checkpoint':<22} {'age':>8} {'hub':>4}  state"]
    for r in rows:
        progress = f"{r.batch if r.batch is not None else '-'} of {r.max_duration or '?'}"
        lines.append(f"{r.run:<18} {(r.model or '?'):<18} {number(r.parameters, ','):>9} {progress:>14} "
                     f"{number(r.tokens, ','):>12} {number(r.train_loss, '.3f'):>7} {number(r.eval_loss, '.3f'):>7} "
                     f"{(r.checkpoint or '-'):<22} {_age(r.checkpoint_age_s):>8} {r.hub_pending:>4}  {r.state}"
                     + (f": {r.detail}" if r.detail else ""))
    return "\n".join(lines)
