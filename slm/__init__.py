"""slm: small llama and mamba language models trained reproducibly on Composer + Streaming.

The Python API for studying a suite is `slm.open` (slm/analysis/suite.py, docs/analysis.md "From Python"); everything
else is the `slm` command and slm/train.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from slm.analysis.suite import Suite


def open(*sources: str | Path, cache_dir: str | Path | None = None, cache_budget: int | None = None) -> Suite:
    """Open the suite of runs named by `sources`: run folders (a glob such as "checkpoints/llama-*" matches several)
    and Hub model repos "ORG/NAME". Hub export branches are cached in `cache_dir` ($SLM_CACHE, else ~/.cache/slm)
    within `cache_budget` bytes (4 GiB), the least recently used evicted first."""
    from slm.analysis.hub_cache import CACHE_BUDGET
    from slm.analysis.suite import open_suite

    budget = CACHE_BUDGET if cache_budget is None else cache_budget
    return open_suite(*sources, cache_dir=cache_dir, cache_budget=budget)
