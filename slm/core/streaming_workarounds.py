"""slm's workarounds of Streaming's behaviour (the policy and the versions: slm/core/workarounds.py).

Patched for a run by `applied()`, and for a command reading shards outside one by `streaming_datasets()`: a shard
folder and its index.json checked before Streaming reads them, its shared-memory prefix registered under the node's
lock, its blocks let go of when done; `stop_reading` stops a partly read dataset's threads.
"""

from __future__ import annotations

import functools
import gc
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from streaming.base.format.mds.reader import MDSReader

from slm.core.foreign import checked_folder, plain_name
from slm.core.shard_index import checked_shard
from slm.core.shared_memory import node_lock
from slm.core.workarounds import replaced, require


def _index_checked(get_shards: Any) -> Any:
    """Wrap Streaming's `Stream.get_shards`: the shard folder checked before it runs, then every shard its index.json
    names (names, counts against bytes)."""
    @functools.wraps(get_shards)
    def checked(self: Any, world: Any, allow_unsafe_types: bool) -> Any:
        folder = Path(self.local, self.split or "")
        checked_folder(folder, "shard folder")  # before anything is downloaded into it
        shards = get_shards(self, world, allow_unsafe_types)
        where = f"shard index {folder / 'index.json'}"
        for i, shard in enumerate(shards):
            if isinstance(shard, MDSReader):
                zipped = shard.zip_data
                checked_shard({"samples": shard.samples, "column_sizes": shard.column_sizes,
                               "raw_data": {"basename": shard.raw_data.basename, "bytes": shard.raw_data.bytes},
                               "zip_data": {"basename": zipped.basename, "bytes": zipped.bytes} if zipped else None},
                              folder, f"{where}, shard {i}")
            for pair in shard.file_pairs:
                for info in filter(None, pair):
                    plain_name(info.basename, where, below=True)
        return shards

    return checked

@contextmanager
def shard_index_checked() -> Iterator[None]:
    """Check a shard folder and what its index.json says before Streaming acts on it. Streaming joins the shard names of
    an index.json (`raw_data`/`zip_data` basenames) to the local folder unchecked (`../x` downloads a remote's file
    outside the folder, decompresses into it or deletes it), writes into the folder through any link it finds there
    (the temporary names it downloads and decompresses into included), and allocates for as many samples as the index
    says. Its `Stream.get_shards` (streaming/base/stream.py) fetches and reads the index before any shard is touched;
    here the folder is checked first (no link leading out: slm/core/foreign.py), and every shard the index names after
    (its names, and its counts against its bytes: slm/core/shard_index.py), on every process, for every stream."""
    require("mosaicml-streaming", "Streaming's shard names read from index.json")
    from streaming.base.stream import Stream

    with replaced((Stream, "get_shards", _index_checked(Stream.get_shards))):
        yield

@contextmanager
def resource_tracker_deaf_to_job_signals() -> Iterator[None]:
    """Start the resource tracker deaf to SGE's job signals. Python's multiprocessing resource tracker
    (multiprocessing/resource_tracker.py), which Streaming's shared memory registers with, is a process of its own in
    the run's process group; it ignores SIGINT and SIGTERM but not SIGUSR1/SIGUSR2, which SGE sends to every process of
    a job at its soft limit and before a kill (-notify). It died of them ("process died unexpectedly, relaunching", then
    a KeyError traceback for each shared-memory block at exit). Started here with those signals ignored, which the
    process it execs inherits."""
    from multiprocessing import resource_tracker

    if threading.current_thread() is not threading.main_thread():  # signals are the main thread's to set
        yield
        return
    before = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        resource_tracker.ensure_running()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    yield

def _register_prefix(streams_local: list[str], streams_remote: list[str | None], world: Any,
                     retry: int = 100) -> tuple[int, Any]:
    """Stand in for Streaming's `get_shm_prefix`, with the prefix chosen and registered by the node's leader alone,
    under the node's lock, and handed to the other processes of the run (the docstring of the context manager below)."""
    import torch.distributed
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared import SharedMemory
    from streaming.base.shared import prefix as streaming

    streaming._check_self(streams_local)
    chosen: int | str | None = None  # the prefix, or the error the leader met
    block = None
    if world.is_local_leader:
        with node_lock():
            for _ in range(retry):  # a process without the lock (Streaming used directly) may take a prefix first
                try:
                    chosen = max(streaming._check_and_find_retrying(streams_local, streams_remote, name, retry)
                                 for name in SHM_TO_CLEAN)
                    data = streaming._pack_locals(streams_local, chosen)
                    block = SharedMemory(streaming._get_path(chosen, LOCALS), True, len(data))
                    block.buf[:len(data)] = data
                    break
                except FileExistsError:
                    continue
                except ValueError as e:  # a local folder another live dataset with a remote uses
                    chosen = str(e)
                    break
            else:
                chosen = f"no free Streaming shared-memory prefix after {retry} tries: other processes took each"
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (world.node, chosen))
        chosen = next(c for node, c in gathered if node == world.node and c is not None)
    if isinstance(chosen, str):
        raise ValueError(chosen)
    if block is None:
        block = SharedMemory(streaming._get_path(chosen, LOCALS), False)
        if streaming._unpack_locals(bytes(block.buf)) != (streams_local, chosen):
            raise RuntimeError(f"Streaming's shared memory prefix {chosen} does not hold this run's local folders")
    return chosen, block

@contextmanager
def prefix_registered_under_node_lock() -> Iterator[None]:
    """Keep runs starting at the same moment on one node from taking the same Streaming prefix or losing its blocks.

    Streaming (streaming/base/shared/prefix.py, `get_shm_prefix`) has every process of a run scan /dev/shm for
    the first free prefix on its own, then the node's leader creates the prefix's `locals` block after a barrier,
    and the others attach to it after another. Another run registering in between makes the leader's create fail
    (FileExistsError), or the processes of one run disagree on their prefix ("shared memory registered does not
    match"); slm's clean-up of stale blocks (slm/core/shared_memory.py) could remove a block between its creation
    and the other processes' attach. Here the leader scans and creates under the node's lock (which the clean-up
    holds too) and gives its prefix to the other processes, which attach to it. `streaming.base.dataset` imported
    the function by name; that name is replaced."""
    require("mosaicml-streaming", "Streaming's shared-memory prefix registration")
    import streaming.base.dataset

    with replaced((streaming.base.dataset, "get_shm_prefix", _register_prefix)):
        yield

def _streaming_blocks() -> list[Any]:
    """Find every Streaming shared-memory block object alive in this process."""
    from streaming.base.shared import SharedMemory

    return [o for o in gc.get_objects() if type(o) is SharedMemory]  # type(): isinstance wakes lazy modules

@contextmanager
def shared_memory_released() -> Iterator[None]:
    """Let go of the Streaming shared memory a run opened, once it is over (finished or failed), so that runs one
    after another in one process (a notebook, tests) do not run out of file descriptors.

    Streaming (streaming/base/shared/memory.py) closes a block only at exit, through an atexit hook per block, and
    a new dataset looking for a free prefix (shared/prefix.py, `_check_and_find`) attaches to the blocks of every
    earlier one and never closes them: each run held some forty more descriptors, and more with every dataset
    left open. The hooks are the only other reference to those objects, so they are found through the garbage
    collector: each one made during the run is closed, and its block removed where this process made it. After a
    run that ended well every process waits for the others first (a block's name is shared by the node's
    processes; a failed run's processes are stopping anyway).
    """
    require("mosaicml-streaming", "Streaming's shared memory held until exit")
    import torch.distributed

    before = {id(block) for block in _streaming_blocks()}
    try:
        yield
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
    finally:
        for block in _streaming_blocks():
            if id(block) not in before:
                block.cleanup()

def stop_reading(dataset: Any) -> None:
    """Stop the background threads of a StreamingDataset iterated only in part, before its shared memory goes.
    Streaming's `__iter__` (streaming/base/dataset.py) leaves its prepare and ready threads running when the caller
    stops early (`slm eval --max-batches`); once `shared_memory_released` has let go of the blocks, they read a shard
    state that is gone and print a traceback ("Invalid shard state") from their thread. Its own `_iterator.exit()` and
    thread pool are used, where this Streaming has them."""
    iterator, executor = getattr(dataset, "_iterator", None), getattr(dataset, "_executor", None)
    if iterator is not None:
        iterator.exit()
    if executor is not None:
        executor.shutdown(wait=True)

@contextmanager
def streaming_datasets() -> Iterator[None]:
    """Provide what a command reading shards through Streaming outside a training run needs (`slm eval`, `slm logprobs`,
    a notebook calling them): its datasets' prefixes registered under the node's lock, and their shared memory let
    go of when it is done, and their shard names checked."""
    with shard_index_checked(), prefix_registered_under_node_lock(), shared_memory_released():
        yield


@contextmanager
def applied() -> Iterator[None]:
    """Apply the process-wide Streaming workarounds, for the duration of a training run."""
    with shard_index_checked(), resource_tracker_deaf_to_job_signals(), prefix_registered_under_node_lock(), \
            shared_memory_released():
        yield
