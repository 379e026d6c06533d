"""Loaded at interpreter start when this folder is on PYTHONPATH: with SLM_TEST_RECORD_BATCHES=DIR, every Composer
Trainer gets a callback appending each training batch it fetches (step, token ids) to DIR/rank{RANK}.jsonl.
It is how tests see what training actually fed, in each process of `composer -n 2` too."""

import os

if os.environ.get("SLM_TEST_RECORD_BATCHES"):
    import json
    from pathlib import Path

    from composer import Callback, Trainer

    class RecordBatches(Callback):
        def after_dataloader(self, state, logger) -> None:
            path = Path(os.environ["SLM_TEST_RECORD_BATCHES"]) / f"rank{os.environ.get('RANK', '0')}.jsonl"
            with open(path, "a") as f:
                f.write(json.dumps({"step": int(state.timestamp.batch) + 1,
                                    "tokens": state.batch["input_ids"].tolist()}) + "\n")

    _init = Trainer.__init__

    def _recording_init(self, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks] if callbacks else []
        _init(self, *args, callbacks=[*callbacks, RecordBatches()], **kwargs)

    Trainer.__init__ = _recording_init
