"""Loaded at interpreter start by every process a test starts (conftest.py puts this folder on PYTHONPATH): what
the tests put into training processes, each only where the test's environment asks for it.

- SLM_TEST_HUB_ROOT=DIR: the Hub double (tests/hub_double/folder_hub.py) on DIR instead of the Hub.
- SLM_TEST_RECORD_BATCHES=DIR: every Composer Trainer gets a callback appending each training batch it fetches
  (step, token ids) to DIR/rank{RANK}.jsonl: how tests see what training actually fed, in each process of
  `composer -n 2` too.
- SLM_TEST_HOLD=DIR and SLM_TEST_HOLD_AT=N[,M...]: every process of the run stops at the end of batch N, once
  that batch's checkpoint is written, writes DIR/held-N-PID and waits until DIR/release-N exists (10 minutes at
  most): a point the run cannot leave before the test has acted on it (tests/helpers, `Hold`). A held process
  that has received a scheduler's signal or a Ctrl-C writes DIR/signalled-N-PID.
"""

import os
import sys
from pathlib import Path

if os.environ.get("SLM_TEST_HUB_ROOT"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hub_double"))
    from folder_hub import install

    install(os.environ["SLM_TEST_HUB_ROOT"])

if os.environ.get("SLM_TEST_RECORD_BATCHES") or os.environ.get("SLM_TEST_HOLD"):
    import json
    import time

    from composer import Callback, Trainer

    RANK = os.environ.get("RANK", "0")

    class RecordBatches(Callback):
        def after_dataloader(self, state, logger) -> None:
            path = Path(os.environ["SLM_TEST_RECORD_BATCHES"]) / f"rank{RANK}.jsonl"
            with open(path, "a") as f:
                f.write(json.dumps({"step": int(state.timestamp.batch) + 1,
                                    "tokens": state.batch["input_ids"].tolist()}) + "\n")

    class HoldAtBatch(Callback):
        """Last of the callbacks: after the checkpoint saver and the signal handling of batch N."""

        def batch_checkpoint(self, state, logger) -> None:
            batch = int(state.timestamp.batch)
            if str(batch) not in os.environ["SLM_TEST_HOLD_AT"].split(","):
                return
            folder = Path(os.environ["SLM_TEST_HOLD"])
            (folder / f"held-{batch}-{os.getpid()}").touch()
            deadline, told = time.monotonic() + 600, False
            while not (folder / f"release-{batch}").exists() and time.monotonic() < deadline:
                if not told and any(getattr(c, "received", None) for c in state.callbacks):  # slm's Preemption
                    (folder / f"signalled-{batch}-{os.getpid()}").touch()
                    told = True
                time.sleep(0.01)

    added = [RecordBatches()] if os.environ.get("SLM_TEST_RECORD_BATCHES") else []
    added += [HoldAtBatch()] if os.environ.get("SLM_TEST_HOLD") else []
    _init = Trainer.__init__

    def _init_with_test_callbacks(self, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks] if callbacks else []
        _init(self, *args, callbacks=[*callbacks, *added], **kwargs)

    Trainer.__init__ = _init_with_test_callbacks
