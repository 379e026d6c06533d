"""Hostile variants of each kind of input, derived systematically from its honest instance.

For every file of an instance, and every name slm creates there, the file is replaced by a link to the outside
canary, to the Hub login's token file (a victim: it must stay byte-equal) and, for a folder, by a link to a folder of
canaries. For every value in a file slm parses (JSON, JSON lines, YAML, a checkpoint's record, an npz, a Parquet
table, a safetensors header), one variant per value and mutation: strings become an absolute path to the canary,
a path climbing out to the outside target, a long string and a planted secret; numbers become negative, huge, large
and wrong-typed. Every pickle gets a payload that creates a file when unpickled; every zip (a checkpoint, an npz)
a member deflated from a huge declared size.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hostile.world import LOGIN_TOKEN, SECRETS, Outside

KINDS = {  # kind -> its instance in the world (a folder or a file)
    "run folder": "ckpt/run",
    "checkpoint": "ckpt.pt",
    "export": "export",
    "shard folder": "shards/eval",
    "hub repo": "hub/model/org/run",
    "tables": "tables",
}
# Names slm (or the libraries it drives) creates in an instance of the kind: a link there is as dangerous as a link
# in place of a file that is there.
CREATED = {
    "run folder": ["ep0-ba10-rank0.pt", ".run.json.partial.json", ".config.yaml.partial.yaml",
                   ".run-state.json.partial.json", ".latest-rank0.pt.partial.pt", ".slm-manifest.json.partial.json",
                   "warm-start", ".hub-pending/ba8"],
    "shard folder": ["shard.00000.mds", "shard.00000.mds.tmp", "index.json.tmp"],
    "export": [],
    "tables": ["logprobs/.ba8.parquet.partial.parquet", ".eval.parquet.partial.parquet"],
}
STRING_MUTATIONS = ("absolute path", "climbing path", "long string", "secret")
NUMBER_MUTATIONS = ("negative", "huge", "large", "string", "null")
HUGE, LARGE = 2**62, 2**24
# The files whose values are mutated, per kind (every file gets the link variants): what slm parses.
VALUES = {
    "run folder": ["ckpt/run/*.json", "ckpt/run/*.jsonl", "ckpt/run/*.yaml", "ckpt/run/.hub-pending/*.json"],
    "checkpoint": ["ckpt.pt"],
    "export": ["export/*.json", "export/*.safetensors"],
    "shard folder": ["shards/eval/*.json", "shards/eval/*.npz"],
    "hub repo": ["hub/model/org/run/main/*.json", "hub/model/org/run/main/*.jsonl",
                 "hub/model/org/run/main/checkpoints/*.symlink", "hub/model/org/run/ba8/*.json"],
    "tables": ["tables/*.parquet", "tables/logprobs/ba8.parquet"],
}
# Values that get one mutation each, in turn (every value mutated, every mutation used, at linear cost): those inside a
# whole training config (a run's config.yaml, its copies in run.json, slm-run.json and every checkpoint), a run's
# history of starts, the logged metrics and the manifest's records of export files, each many values of one kind read
# as one record, and those of files a library parses (transformers' config and tokenizer files, the safetensors
# header). Every other value gets every mutation.
ROTATED_FILES = ("config.yaml", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", ".safetensors")


def rotated(file: str, field: str) -> bool:
    return (file.endswith(ROTATED_FILES) or field.startswith(("config.", "RunInfo.config.", "starts[", "metrics."))
            or "/" in field.rsplit(".", 1)[-1] or ".export" in field)


@dataclass(frozen=True)
class Variant:
    """One hostile change to one honest instance: `apply` makes it in a copy of the world."""

    kind: str
    file: str  # relative to the world
    mutation: str
    field: str = ""  # the value's place in the file (dotted), for a value mutation

    @property
    def label(self) -> str:
        return f"{self.kind}: {self.file}{f' [{self.field}]' if self.field else ''}: {self.mutation}"

    @property
    def is_link(self) -> bool:
        return self.mutation.startswith("link")

    def apply(self, world: Path, outside: Outside) -> None:
        path = world / self.file
        if self.is_link:
            target = {"link to the canary": outside.canary, "link to the token file": outside.token_file,
                      "link to a folder of canaries": outside.canary_dir}[self.mutation]
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(target)
        elif self.mutation == "payload":
            _plant_payload(path, outside.marker)
        elif self.mutation == "deflate bomb":
            _deflate_bomb(path)
        elif self.mutation == "remote code":
            _plant_remote_code(path, outside.marker)
        else:
            _edit_value(path, self.field, lambda value: mutated(value, self.mutation, world, outside))


def mutated(value: Any, mutation: str, world: Path, outside: Outside) -> Any:
    """The hostile replacement of `value`."""
    return {
        "absolute path": lambda: str(outside.canary),
        "climbing path": lambda: "x/" + "../" * 24 + str(outside.target / "climbed").lstrip("/"),
        "long string": lambda: "a" * 5000,
        "secret": lambda: LOGIN_TOKEN if isinstance(value, str) and len(value) % 2 else SECRETS["PGPASSWORD"],
        "negative": lambda: -1,
        "huge": lambda: HUGE,
        "large": lambda: LARGE,
        "string": lambda: "7",
        "null": lambda: None,
    }[mutation]()


# -- deriving ----------------------------------------------------------------------------------------------------------

def variants(world: Path, kind: str) -> list[Variant]:
    """Every variant of the kind's instance in `world`."""
    instance = world / KINDS[kind]
    files = [instance] if instance.is_file() else sorted(p for p in instance.rglob("*")
                                                         if p.is_file() or p.is_symlink())
    found: list[Variant] = []
    rel = lambda p: str(p.relative_to(world))  # noqa: E731
    if kind != "hub repo":  # the Hub serves contents, never links
        for path in files if instance.is_dir() else []:
            found += [Variant(kind, rel(path), m) for m in ("link to the canary", "link to the token file")]
        for name in CREATED.get(kind, []):
            found += [Variant(kind, rel(instance / name), m) for m in ("link to the canary", "link to the token file")]
        for folder in sorted(p for p in instance.rglob("*") if p.is_dir() and not p.is_symlink()) \
                if instance.is_dir() else []:
            found.append(Variant(kind, rel(folder), "link to a folder of canaries"))
    for path in files:
        if path.is_symlink():
            continue
        if any(fnmatch.fnmatch(rel(path), pattern) for pattern in VALUES.get(kind, ())):
            for i, (field, value) in enumerate(_values(path)):
                mutations = STRING_MUTATIONS if isinstance(value, str) else NUMBER_MUTATIONS
                if rotated(rel(path), field):  # one mutation each, in turn: every value, every mutation, linear cost
                    mutations = (mutations[i % len(mutations)],)
                found += [Variant(kind, rel(path), m, field) for m in mutations]
        if path.suffix == ".pt":
            found += [Variant(kind, rel(path), "payload"), Variant(kind, rel(path), "deflate bomb")]
        elif path.suffix == ".npz":
            found.append(Variant(kind, rel(path), "deflate bomb"))
    if kind in ("export", "hub repo"):
        found.append(Variant(kind, rel(instance / ("ba8" if kind == "hub repo" else "")), "remote code"))
    return found


def _values(path: Path) -> Iterator[tuple[str, Any]]:
    """(dotted place, value) of every scalar value slm could read from the file (none for a file it does not parse)."""
    tree = _read(path)
    if tree is None:
        return
    yield from _leaves(tree, "")


def _key(prefix: str, key: Any) -> str:
    """The place of `key` below `prefix`: `.key`, or `["key"]` for a key holding a dot, a bracket or a quote."""
    if isinstance(key, str) and re.fullmatch(r"[^.\[\]\"]+", key):
        return f"{prefix}.{key}" if prefix else key
    return f"{prefix}[{json.dumps(str(key))}]"


def _leaves(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        items = list(node.items())
        for key, value in items if len(items) <= 32 else items[:2]:  # a table (a vocabulary): its first two
            yield from _leaves(value, _key(prefix, key))
    elif isinstance(node, list) and node:  # its first element stands for the others
        yield from _leaves(node[0], f"{prefix}[0]")
    elif isinstance(node, (str, int, float)) and not isinstance(node, bool):
        yield prefix, node


# -- reading and writing each format --------------------------------------------------------------------------------

def _read(path: Path) -> Any:
    """The file's values as a tree of dicts and lists; None for a format without values to mutate."""
    name = path.name
    if name.endswith(".json") or name == "slm-manifest.json":
        return json.loads(path.read_text())
    if name.endswith(".jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {"first": lines[0], "last": lines[-1]} if lines else None
    if name.endswith(".yaml"):
        return yaml.safe_load(path.read_text())
    if name.endswith(".symlink"):  # the Hub's `latest` pointer: its text
        return {"text": path.read_text()}
    if name.endswith(".pt"):
        state = _load_pickle(path)["state"]
        return {"timestamp": state["timestamp"]["Timestamp"], "RunInfo": {
            k: v for k, v in state["callbacks"]["RunInfo"].items() if k in ("run_name", "tokenizer", "tokenizer_hash",
                                                                           "parameters", "config")}}
    if name.endswith(".npz"):
        import numpy as np

        with np.load(path) as data:
            return {key: data[key].reshape(-1)[0].item() for key in data.files if data[key].size}
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return {c: _scalar(table.column(c)[0].as_py()) for c in table.column_names if table.num_rows}
    if name.endswith(".safetensors"):
        return _safetensors_header(path)[1]
    return None


def _scalar(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def _edit_value(path: Path, field: str, change: Callable[[Any], Any]) -> None:
    name = path.name
    if name.endswith(".json"):
        path.write_text(json.dumps(_set(json.loads(path.read_text()), field, change)))
    elif name.endswith(".jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        index = 0 if field.startswith("first") else len(lines) - 1
        lines[index] = _set(lines[index], field.split(".", 1)[1], change)
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    elif name.endswith(".yaml"):
        path.write_text(yaml.safe_dump(_set(yaml.safe_load(path.read_text()), field, change)))
    elif name.endswith(".symlink"):
        path.write_text(str(change(path.read_text())))
    elif name.endswith(".pt"):
        _edit_checkpoint(path, field, change)
    elif name.endswith(".npz"):
        _edit_npz(path, field, change)
    elif name.endswith(".parquet"):
        _edit_parquet(path, field, change)
    elif name.endswith(".safetensors"):
        length, header = _safetensors_header(path)
        data = path.read_bytes()
        new = json.dumps(_set(header, field, change)).encode()
        path.write_bytes(len(new).to_bytes(8, "little") + new + data[8 + length:])


def _set(tree: Any, field: str, change: Callable[[Any], Any]) -> Any:
    """Replace the value at the dotted place `field` (list items as `[i]`) by `change(value)`; return the tree."""
    parts: list[Any] = []
    for key, index, quoted in re.findall(r'\.?([^.\[\]"]+)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]', field):
        parts.append(key if key else int(index) if index else json.loads(quoted))
    node = tree
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = change(node[parts[-1]])
    return tree


def _load_pickle(path: Path) -> dict:
    import torch

    from slm.core.trust import checkpoint_globals

    # Added for the whole (harness) process: `safe_globals` is a context of the process, and lanes on threads
    # entering and leaving it at once took each other's globals away.
    torch.serialization.add_safe_globals(checkpoint_globals())
    return torch.load(path, weights_only=True)


def _edit_checkpoint(path: Path, field: str, change: Callable[[Any], Any]) -> None:
    import torch

    whole = _load_pickle(path)
    state = whole["state"]
    tree = {"timestamp": state["timestamp"]["Timestamp"], "RunInfo": state["callbacks"]["RunInfo"]}
    _set(tree, field, change)
    torch.save(whole, path)


def _plant_payload(path: Path, marker: Path) -> None:
    import torch

    whole = _load_pickle(path)
    whole["state"]["callbacks"]["RunInfo"]["note"] = _Payload(str(marker))
    torch.save(whole, path)


class _Payload:
    """Unpickled, it creates the file `marker` (any code could run instead)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


REMOTE_CODE = """import pathlib
pathlib.Path({marker!r}).touch()
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _plant_remote_code(folder: Path, marker: Path) -> None:
    """Make an export whose config and tokenizer name code of its own (`auto_map`, a model type transformers does not
    know): loaded with trust_remote_code, or with a `y` at transformers' prompt, the code creates `marker`."""
    (folder / "evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                               "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))


def _deflate_bomb(path: Path) -> None:
    """Replace the zip's largest member by 2 GB of zeros, deflated: a few MB on disk."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        members = {info.filename: z.read(info.filename) for info in infos}
    biggest = max(members, key=lambda name: len(members[name]))
    bomb = path.with_suffix(".bomb")
    with zipfile.ZipFile(bomb, "w") as z:
        for info in infos:
            if info.filename == biggest:
                member = zipfile.ZipInfo(info.filename)
                member.compress_type = zipfile.ZIP_DEFLATED
                with z.open(member, "w", force_zip64=True) as f:
                    chunk = bytes(1 << 24)
                    for _ in range(128):
                        f.write(chunk)
            else:
                z.writestr(info, members[info.filename])
    os.replace(bomb, path)


def _edit_npz(path: Path, field: str, change: Callable[[Any], Any]) -> None:
    import numpy as np

    with np.load(path) as data:
        arrays = {key: data[key].copy() for key in data.files}
    value = change(arrays[field].reshape(-1)[0].item())
    array = arrays[field]
    try:
        flat = array.reshape(-1).copy()
        flat[0] = value
        arrays[field] = flat.reshape(array.shape)
    except (TypeError, ValueError, OverflowError):
        arrays[field] = np.array(value)  # a string or None: another type altogether
    np.savez(path, **arrays)


def _edit_parquet(path: Path, field: str, change: Callable[[Any], Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    old = rows[0][field]
    new = change(_scalar(old))
    rows[0][field] = [new, *old[1:]] if isinstance(old, list) and old else new
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # another type: the column becomes text
        for row in rows:
            row[field] = json.dumps(row[field])
        table = pa.Table.from_pylist(rows)
    pq.write_table(table, path)


def _safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return length, json.loads(f.read(length))
