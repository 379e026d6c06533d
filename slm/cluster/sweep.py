"""Sweeps: the tasks of a suite array, one per (yaml, combination of grid values).

    python -m slm.cluster.sweep [--dry-run | --count | --task N] [--per-device K] [--grid KEY=V1,V2,...]...
                        CONFIG.yaml... [key=value ...]
    slm sweep ...                                                   (the same)
    slm sweep --local -j K ...                   (the runs on this machine, K at a time: slm/cluster/local.py)

jobs/suite.sbatch and jobs/suite.sh call it: on submission for the array's size (--count, which first loads
every task's config, so a typo fails there and not in the array), in each array task for that task's
arguments to jobs/train.sbatch / jobs/train.sh (--task N, counting from 0; no config checks: fast). Each task
expands the sweep again from the same arguments, so editing a yaml's sweep block while the array waits changes
which task trains what.

--per-device K: each array task trains K runs at once on its node (tiny models leave a device mostly idle):
array task N is tasks N*K to N*K+K-1, their arguments joined by --next, which `python -m slm.cluster.launch` starts side
by side (the cores split between them, or the GPUs shared; slm/cluster/launch.py). --count gives the array's size.

The grid: each `--grid KEY=V1,V2,...` is one axis (values split at commas outside brackets, each written as in
a key=value override), and so is each KEY=V1,V2,... right after it (`--grid optimizer.lr=1e-3,3e-3 seed=0,1`;
a one-value key=value there is an override). A yaml's `sweep:` block (`KEY: [V1, V2]`, dotted or nested keys,
merged down its `base:` chain like any key) adds axes to that yaml's tasks. A key in both: --grid's values
replace the block's. A key=value override of a key the block sweeps pins it (the axis is dropped); one given
both to --grid and as an override is an error.

The tasks: every yaml in the order given, times every combination of its axes, the first axis changing slowest.
A yaml without axes is one task, trained with the overrides as given. The overrides apply to every task.

run_name: the name the yaml would train under (a run_name=... override, else the yaml's own run_name, else its
stem), then for each axis (even one of one value) `_` + the last component of its key + the value:
`mamba-100k_lr1e-3_seed0`. In the value, brackets, quotes and spaces are dropped and other characters than
letters, digits and . _ + - become '-'. Keys sharing a last component are written in full
(`optimizer.lr1e-3`). Submitting the same sweep again gives every task its run_name again, so each resumes on
its own. Two tasks with one run_name (or one run folder) are an error.

No torch, no composer at import or in --task: this runs on login nodes and at the start of every array task.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slm.cluster.launch import NEXT
from slm.core.errors import SlmError, run_command

KEY = re.compile(r"^\w+(\.\w+)*$")
NOT_SWEPT = ("run_name", "base", "sweep", "configs")  # derived or consumed while loading: never an axis


@dataclass(frozen=True)
class Task:
    """One run of a sweep: its configs, overrides and run_name."""
    configs: tuple[str, ...]  # yaml files, merged left to right (one per task from the command line)
    overrides: tuple[str, ...]  # key=value: the given ones, then the combination's, then the derived run_name
    run_name: str
    combination: tuple[tuple[str, str], ...]  # (key, value as written in the override)

    @property
    def args(self) -> list[str]:
        """The arguments of slm/train.py, jobs/train.sbatch and jobs/train.sh for this task."""
        return [*self.configs, *self.overrides]


def split_values(text: str) -> list[str]:
    """Split `a,b,[c,d]` -> ['a', 'b', '[c,d]']: commas inside brackets or braces belong to the value."""
    values, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    return [*values, text[start:]]


def check_axis(key: str, texts: list[str], where: str) -> None:
    """Check an axis: a config key that may be swept, values as override texts, none empty, none twice."""
    if not KEY.match(key):
        raise SlmError(f"{where}: '{key}' is not a config key (e.g. optimizer.lr)")
    if key.split(".")[0] in NOT_SWEPT:
        hint = " (give run_name=PREFIX to name the runs PREFIX_...)" if key == "run_name" else ""
        raise SlmError(f"{where}: '{key}' cannot be swept{hint}")
    if not texts:
        raise SlmError(f"{where}: '{key}' has no values")
    if "" in texts:
        raise SlmError(f"{where}: '{key}' has an empty value")
    twice = next((t for i, t in enumerate(texts) if t in texts[:i]), None)
    if twice is not None:
        raise SlmError(f"{where}: '{key}' lists the value {twice} twice")


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """Parse --grid KEY=V1,V2,... arguments -> {key: [value texts]}, in the order given."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise SlmError(f"--grid '{item}' is not KEY=V1,V2,...: e.g. --grid optimizer.lr=1e-3,3e-3")
        key = key.strip()
        if key in grid:
            raise SlmError(f"--grid {key} is given twice: list all its values in one --grid {key}=V1,V2,...")
        values = split_values(text)
        check_axis(key, values, f"--grid {item}")
        grid[key] = values
    return grid


def override_text(value: Any) -> str:
    """Format a yaml value as the right-hand side of a key=value override that gives it back."""
    if isinstance(value, str):
        from omegaconf import OmegaConf

        try:
            parsed = OmegaConf.from_dotlist([f"x={value}"]).x
        except Exception:  # whatever the override parser refuses goes quoted
            parsed = None
        return value if value and parsed == value else json.dumps(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def flatten(block: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a sweep block's nested mappings -> dotted keys (`optimizer: {lr: [..]}` -> `optimizer.lr`)."""
    flat: dict[str, Any] = {}
    for key, value in block.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_yamls(configs: Sequence[str]) -> tuple[str | None, dict[str, list[str]]]:
    """Read the run_name the yamls set (or None) and their sweep block, merged as slm.core.config.load_config merges
    them (each yaml's `base:` chain, root first; the yamls left to right) but without the schema or its checks."""
    from omegaconf import DictConfig, OmegaConf

    from slm.core.config import yaml_chain

    merged = OmegaConf.create()
    for path in configs:
        for _, node in yaml_chain(Path(path)):
            merged = OmegaConf.merge(merged, node)
    block = merged.get("sweep")
    where = f"the sweep block of {' + '.join(configs)}"
    if block is None:
        return merged.get("run_name"), {}
    if not isinstance(block, DictConfig):
        raise SlmError(f"{where} must map keys to lists of values, e.g. sweep: {{optimizer.lr: [1.0e-3, 3.0e-3]}}")
    axes: dict[str, list[str]] = {}
    for key, values in flatten(OmegaConf.to_container(block, resolve=True)).items():
        if not isinstance(values, list):
            raise SlmError(f"{where}: '{key}' must list its values, e.g. {key}: [{values}, ...], not {values!r}")
        axes[key] = [override_text(v) for v in values]
        check_axis(key, axes[key], where)
    return merged.get("run_name"), axes


def name_part(text: str) -> str:
    """Return a value as it appears in a run_name: letters, digits and . _ + - kept, brackets, quotes and spaces
    dropped, other runs of characters '-' (`[0.9, 0.95]` -> `0.9-0.95`, `s3://b/x` -> `s3-b-x`)."""
    text = re.sub(r"[\[\]{}\"'\s]+", "", text)
    return re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._+-]+", "-", text))


def labels(keys: Sequence[str]) -> dict[str, str]:
    """Return each key's label in run_names: its last component, or the whole key where two share the last one."""
    last = [k.rpartition(".")[2] for k in keys]
    return {k: (k if last.count(short) > 1 else short) for k, short in zip(keys, last, strict=True)}


def _covers(key: str, other: str) -> bool:
    """Return whether setting `key` sets `other` (the same key, or a parent of it)."""
    return other == key or other.startswith(key + ".")


def expand(configs: Sequence[str | Sequence[str]], overrides: Sequence[str] = (), grid: Sequence[str] = ()) -> \
        list[Task]:
    """Return the tasks of a sweep: each entry of `configs` (a yaml, or yamls merged left to right) times each
    combination of its axes (the `--grid` items `grid`, and its sweep block). Reads the yamls, checks no config."""
    from slm.core.config import default_run_name, parse_override
    from slm.core.config_rules import safe_run_name

    if not configs:
        raise SlmError("no config given: name at least one CONFIG.yaml")
    axes_given = parse_grid(grid)
    parsed = {item: parse_override(item) for item in overrides}
    keys = [key for key, _ in parsed.values()]
    for item, (key, _) in parsed.items():
        clash = next((k for k in axes_given if _covers(key, k) or _covers(k, key)), None)
        if clash:
            raise SlmError(f"'{clash}' is both swept (--grid) and set ({item}): drop one")
    user_name = next((value for key, value in reversed(parsed.values()) if key == "run_name"), None)
    kept = tuple(item for item, (key, _) in parsed.items() if key != "run_name")

    tasks: list[Task] = []
    for entry in configs:
        files = (entry,) if isinstance(entry, (str, Path)) else tuple(entry)
        files = tuple(str(f) for f in files)
        own_name, block = read_yamls(files)
        block = {k: v for k, v in block.items() if not any(_covers(key, k) for key in keys)}  # pinned
        axes = block | axes_given
        prefix = user_name or own_name or default_run_name(files)
        if not axes:
            tasks.append(Task(files, tuple(overrides), prefix, ()))
            continue
        label = labels(list(axes))
        for values in itertools.product(*axes.values()):
            combination = tuple(zip(axes, values, strict=True))
            name = "_".join([prefix, *(label[k] + name_part(v) for k, v in combination)])
            derived = (*kept, *(f"{k}={v}" for k, v in combination), f"run_name={name}")
            tasks.append(Task(files, derived, name, combination))

    seen: dict[str, int] = {}
    for i, task in enumerate(tasks):
        unsafe = safe_run_name("run_name", task.run_name, None)
        if unsafe:
            raise SlmError(f"task {i}: {unsafe}; run_names come from yaml names, run_name=... and grid values")
        if task.run_name in seen:
            raise SlmError(f"tasks {seen[task.run_name]} and {i} would both train run_name '{task.run_name}': "
                           "give the yamls distinct names, or sweep a value that tells them apart")
        seen[task.run_name] = i
        bad = next((a for a in task.args if "\n" in a), None)
        if bad is not None:
            raise SlmError(f"task {i}: an argument holds a line break: {bad!r}")
    return tasks


def check_tasks(tasks: Sequence[Task]) -> None:
    """Load every task's config as training will (slm.core.config.load_config: keys, types, value rules), and refuse
    two tasks writing one run folder."""
    from slm.core.config import load_config

    folders: dict[Path, int] = {}
    for i, task in enumerate(tasks):
        try:
            cfg = load_config(list(task.configs), list(task.overrides))
        except SlmError as e:
            raise SlmError(f"task {i} ({task.run_name}): {e}") from e
        folder = cfg.folder.resolve()
        if folder in folders:
            raise SlmError(f"tasks {folders[folder]} and {i} would both write {cfg.folder}: put {{run_name}} in "
                           "save_folder")
        folders[folder] = i


def array_size(tasks: Sequence[Task], per_device: int) -> int:
    """Return how many array tasks train `tasks`, `per_device` runs in each."""
    return -(-len(tasks) // per_device)


def array_task_args(tasks: Sequence[Task], index: int, per_device: int) -> list[str]:
    """Return array task `index`'s arguments to jobs/train.*: its runs' arguments, joined by --next."""
    n = array_size(tasks, per_device)
    if not 0 <= index < n:
        raise SlmError(f"task {index} (counting from 0) does not exist: the sweep has {n} task{'s' * (n != 1)} "
                       f"(submit with sbatch --array=0-{n - 1}, or qsub -t 1-{n})")
    runs = tasks[index * per_device:(index + 1) * per_device]
    return [arg for i, task in enumerate(runs) for arg in ([NEXT] if i else []) + task.args]


def table(tasks: Sequence[Task], per_device: int = 1) -> str:
    """Return what --dry-run prints: a line on the array, then task, run_name, config(s) and combination."""
    n, size = len(tasks), array_size(tasks, per_device)
    rows = [("task", "run_name", "config", "combination")]
    rows += [(str(i), t.run_name, " ".join(t.configs), " ".join(f"{k}={v}" for k, v in t.combination) or "-")
             for i, t in enumerate(tasks)]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    shared = f", {per_device} at once on each array task's device: {size} array tasks" if per_device > 1 else ""
    lines = [f"{n} task{'s' * (n != 1)}{shared} (Slurm: sbatch --array=0-{size - 1}; SGE: qsub -t 1-{size})"]
    lines += ["  ".join([*(r[c].ljust(widths[c]) for c in range(3)), r[3]]).rstrip() for r in rows]
    return "\n".join(lines)


def build_parser(prog: str = "slm sweep") -> argparse.ArgumentParser:
    """Return `slm sweep`'s parser, named `prog`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [--dry-run | --count | --task N | --local [-j K]] "
                                           "[--grid KEY=V1,V2,...]... CONFIG.yaml... [key=value ...]")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print the tasks (the default): index, run_name, config, combination")
    mode.add_argument("--count", action="store_true", help="print the number of tasks")
    mode.add_argument("--task", type=int, metavar="N", help="print task N's arguments (from 0), one a line")
    mode.add_argument("--local", action="store_true",
                      help="train the runs on this machine, -j at a time; again: resumes stopped runs, skips finished "
                           "ones; Ctrl-C stops them all with checkpoints (slm/cluster/local.py)")
    parser.add_argument("-j", "--jobs", type=int, default=1, metavar="K", help="with --local: runs at once, each on "
                        "its share of the CPU cores, or sharing the GPUs (default 1)")
    parser.add_argument("--logs", default="logs", metavar="DIR", help="with --local: each run's output in "
                                                                       "DIR/RUN_NAME.log (default: logs)")
    parser.add_argument("--per-device", type=int, default=1, metavar="K",
                        help="K runs at once in each array task, sharing its GPU or splitting its CPU cores "
                             "(default 1); --task N then prints array task N's runs, joined by --next")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="an axis of the grid, and each KEY=V1,V2,... right after it "
                             "(--grid optimizer.lr=1e-3,3e-3 seed=0,1)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("args", nargs="*", metavar="ARG",
                        help="yaml files, one task each (times the grid), then key=value overrides for every task")
    return parser


def run(args: argparse.Namespace) -> int | None:
    """Do what the parsed `slm sweep` arguments ask: print tasks, a task's arguments or a count, or run locally."""
    configs = [a for a in args.args if "=" not in a]
    if args.per_device < 1:
        raise SlmError(f"--per-device {args.per_device}: give at least 1 run a device")
    tasks = expand(configs, [a for a in args.args if "=" in a], args.grid)
    if args.task is not None:
        print("\n".join(array_task_args(tasks, args.task, args.per_device)))
        return None
    check_tasks(tasks)
    if args.local:
        from slm.cluster.local import run_locally

        return run_locally(tasks, args.jobs, Path(args.logs))
    print(array_size(tasks, args.per_device) if args.count else table(tasks, args.per_device))
    return None


def grid_runs(argv: Sequence[str]) -> list[str]:
    """Read `--grid optimizer.lr=1e-3,3e-3 seed=0,1` as two axes: the key=value arguments right after a --grid axis that
    list several values are axes too (a one-value key=value there is an override, as anywhere)."""
    out: list[str] = []
    after_grid = False
    for i, arg in enumerate(argv):
        several = "=" in arg and not arg.startswith("-") and len(split_values(arg.partition("=")[2])) > 1
        if after_grid and several:
            out += ["--grid", arg]
            continue
        after_grid = arg.startswith("--grid=") or (i > 0 and argv[i - 1] == "--grid")
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None, prog: str = "slm sweep", debug: bool = False) -> int:
    """Run the `slm sweep` command line `argv` (default: sys.argv) and return its exit status."""
    args = build_parser(prog).parse_intermixed_args(grid_runs(sys.argv[1:] if argv is None else list(argv)))
    return run_command(prog, lambda: run(args), debug or args.debug)


if __name__ == "__main__":
    sys.exit(main())
