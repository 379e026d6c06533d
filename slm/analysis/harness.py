"""lm-evaluation-harness tasks on slm checkpoints (`slm eval --tasks`): lm-eval's own HF model class over the
loaded model and its own task registry (its built-in tasks, and yamls of yours under an include path); a score
per (task, metric) of each checkpoint, rows of the eval table beside the training metrics."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from slm.core.errors import SlmError

if TYPE_CHECKING:
    from slm.analysis.trained_models import Loaded

ANALYSIS_EXTRA = "pip install -e '.[analysis]' on the current stack (make venv STACK=current; docs/analysis.md)"


def analysis_package(module: str, what: str) -> ModuleType:
    """Import `module` of the optional `analysis` extra, or one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SlmError(f"{what} needs {module.split('.')[0]}, which is not installed ({e}): {ANALYSIS_EXTRA}") from e


def task_source(task: str) -> str:
    """Return the eval table's `data` value of a task's rows (beside the MDS folders of the training metrics)."""
    return f"lm-eval:{task}"


class Harness:
    """The lm-eval tasks to run on each checkpoint, looked up once: `include_path`'s yamls first, lm-eval's
    built-in tasks (about 25 s to index) only when a task is not among them."""

    def __init__(self, tasks: list[str], include_path: Path | None = None, limit: int | None = None,
                 batch_size: int = 16) -> None:
        tasks_module = analysis_package("lm_eval.tasks", "slm eval --tasks")
        if include_path is not None and not include_path.is_dir():
            raise SlmError(f"--include-path {include_path}: no such folder (it holds task yamls of your own)")
        if limit is not None and limit < 1:
            raise SlmError(f"--limit must be at least 1, got {limit}")
        include = str(include_path) if include_path else None
        manager = tasks_module.TaskManager(include_path=include, include_defaults=False) if include else None
        if manager is None or set(tasks) - set(manager.all_tasks):
            manager = tasks_module.TaskManager(include_path=include)
        unknown = sorted(set(tasks) - set(manager.all_tasks))
        if unknown:
            raise SlmError(f"unknown lm-eval task(s) {', '.join(unknown)}: `lm-eval ls tasks` lists the built-in "
                           "ones; a task of your own is a yaml in a folder given as --include-path")
        self.tasks, self.manager, self.limit, self.batch_size = tasks, manager, limit, batch_size

    def scores(self, loaded: Loaded, task: str) -> dict[str, tuple[int | None, float]]:
        """Score `task` (a group: each of its tasks) on the loaded checkpoint: {"TASK/METRIC": (documents, value)}."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=self.batch_size,
                     trust_remote_code=False)
        result = lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=self.manager, limit=self.limit,
                                         log_samples=False)
        counts = result.get("n-samples", {})
        scores = {}
        for name, metrics in result["results"].items():
            for key, value in metrics.items():
                metric, _, kind = key.partition(",")
                if kind and isinstance(value, (int, float)) and not math.isnan(value):
                    label = metric if kind == "none" else f"{metric},{kind}"
                    scores[f"{name}/{label}"] = (counts.get(name, {}).get("effective"), float(value))
        return scores
