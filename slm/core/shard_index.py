"""What an MDS folder's index.json (maybe someone else's) may say, checked before slm or Streaming reads, downloads,
decompresses or allocates anything by it (docs/security.md): each shard's file names relative paths below the folder;
its counts whole numbers; its samples no more than its bytes can hold (a sample takes its fixed-size columns' bytes,
4 bytes for each of its other columns, and 4 for its offset); its declared sizes those of its files where they are
in the folder; and a compressed shard not decompressing to more than `MAX_EXPANSION` times its size. So what Streaming
allocates for a folder's samples is bounded by the folder's bytes.

Used by slm's own check of a folder (slm/data/loading.py, `check_shards`) and inside Streaming, for every dataset slm
makes (slm/core/streaming_workarounds.py, `shard_index_checked`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slm.core.errors import Refused, SlmError
from slm.core.foreign import count, mapping, plain_name, sequence

MAX_EXPANSION = 64  # bytes of a decompressed shard per compressed byte: token ids compress 2-5x; far past that, a bomb
OFFSET_BYTES = 4  # MDS: a uint32 offset per sample, and the count and the last offset (8 bytes) besides


def checked_shard(shard: Any, folder: Path, where: str) -> dict:
    """Return one shard's entry of an index.json (`where` names it) once its names, counts and sizes hold."""
    shard = mapping(shard, where)
    samples = count(shard.get("samples"), f"{where}: samples")
    files = {}
    for part in ("raw_data", "zip_data"):
        info = shard.get(part)
        if info is None and part == "zip_data":
            continue
        info = mapping(info, f"{where}: {part}")
        name = plain_name(info.get("basename"), f"{where}: {part}.basename", below=True)
        files[part] = (folder / name, count(info.get("bytes"), f"{where}: {part}.bytes"))
    sizes = sequence(shard.get("column_sizes") or [], f"{where}: column_sizes", at_most=2**16)
    per_sample = OFFSET_BYTES + sum(4 if size is None else count(size, f"{where}: column_sizes") for size in sizes)
    raw_path, raw_bytes = files["raw_data"]
    if samples * per_sample > max(raw_bytes - 2 * OFFSET_BYTES, 0):
        raise Refused(f"{where} says its shard {raw_path.name} holds {samples:,} samples, which {raw_bytes:,} bytes "
                      f"cannot (each takes at least {per_sample}): refused (docs/security.md)")
    for path, declared in files.values():
        if path.is_file() and path.stat().st_size != declared:
            raise SlmError(f"shard {path} is {path.stat().st_size} bytes but index.json says {declared}: it is "
                           "truncated or corrupt; re-run `slm tokenize`")
    if "zip_data" in files and not raw_path.is_file():
        zip_bytes = files["zip_data"][1]
        if raw_bytes > MAX_EXPANSION * max(zip_bytes, 1):
            raise Refused(f"{where} says its shard {files['zip_data'][0].name} of {zip_bytes:,} bytes decompresses to "
                          f"{raw_bytes:,}, more than {MAX_EXPANSION} times its size: refused as a decompression bomb "
                          "(docs/security.md); data that truly compresses so well is written with --compression none")
    return shard


def checked_index(index: Any, folder: Path, where: str) -> list[dict]:
    """Return the shards of a parsed index.json (`where` names it) once every one is `checked_shard`."""
    shards = sequence(mapping(index, where).get("shards"), f"{where}: shards")
    return [checked_shard(shard, folder, f"{where}, shard {i}") for i, shard in enumerate(shards)]
