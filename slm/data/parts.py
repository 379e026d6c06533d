"""Tokenizing a corpus in parts (`slm tokenize --parts N`): the same shards as one process, from N processes or hosts.

Part p of N is a contiguous range of the input's documents (`part_range`; of a streamed input, whose documents are
not counted before they are read, a contiguous run of its files), tokenized alone — a process of this
machine, or an array task on another host — into its token stream: each document's ids and its <eos>, in order, as
the chunking rule concatenates them (`tokens.bin`), and each document's length (`lengths.npy`). A part cannot cut
its own samples: where its first sample starts depends on how many tokens all earlier parts hold. The merge does
that: it feeds the parts' streams in order through the one chunker and writer of `slm tokenize`
(slm/data/shards.py, `write_streams`), so the samples, the shards they fill and the document record are byte for
byte those of one process (docs/design.md, "Tokenizing in parts").

The parts live in `OUT.parts/` beside the output folder `OUT`, each `part-P-of-N/` written whole or not at all
(written beside, under a name of its writer's own, and renamed): a killed part leaves only its writer's `.partial`
folder and is redone alone on the next run, finished ones are kept, and two writers of one part (a resubmission
while the first still runs) both end with the one folder. Each records what it was made from (the input's
fingerprint and size, the tokenizer, seq_len, its range); the merge refuses a part missing, incomplete or made from
anything else, naming it. `OUT.parts/` is removed once `OUT` is written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from slm.core.errors import SlmError, describe_error
from slm.core.foreign import mapping, read_json
from slm.core.paths import partial_folder
from slm.data.documents import part_range
from slm.data.shards import ShardStats, encoded_streams, token_dtype, write_streams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from slm.data.documents import Input

PART_RECORD = "part.json"
TOKENS_FILE = "tokens.bin"
LENGTHS_FILE = "lengths.npy"
MAX_PARTS = 100_000
MERGE_DOCUMENTS = 10_000  # documents a merge step feeds the chunker: bounded memory, whatever a part holds
MADE_FROM = {"fingerprint": "other input (its files changed since, or are at another path?)",
             "input_documents": "other input", "input_files": "other input", "source": "another input",
             "tokenizer": "another tokenizer",
             "seq_len": "another seq_len"}


@dataclass(frozen=True)
class Job:
    """What one `slm tokenize --parts N` makes: its input, tokenizer and seq_len, each part's folder."""

    source: dict[str, Any]  # dataset, feature, split: `slm-dataset.json`'s source
    fingerprint: str  # the input's (slm/data/documents.py, `Input`): another file, edit or slice, another value
    documents: int | None  # the input's documents, where counted before reading (not a streamed input)
    files: int | None  # a streamed input's files
    tokenizer: str  # the tokenizer's content hash
    dtype: str  # of its token ids (slm/data/shards.py, `token_dtype`)
    seq_len: int
    parts: int
    out_dir: Path

    @property
    def folder(self) -> Path:
        """The folder of the job's parts: beside the output folder, its name with `.parts` added."""
        return self.out_dir.with_name(self.out_dir.name + ".parts")

    def part_folder(self, part: int) -> Path:
        """Return the folder of part `part` (1-based): `part-P-of-N` in the parts folder."""
        return self.folder / f"part-{part}-of-{self.parts}"

    def record(self, part: int) -> dict[str, Any]:
        """What part `part` (1-based) must have been made from."""
        if self.documents is None:
            of_input = {"input_files": self.files}
        else:
            start, end = part_range(self.documents, self.parts, part)
            of_input = {"input_documents": self.documents, "start": start, "end": end, "documents": end - start}
        return {"source": self.source, "fingerprint": self.fingerprint, **of_input, "tokenizer": self.tokenizer,
                "seq_len": self.seq_len, "part": part, "parts": self.parts}

    def done(self, part: int) -> bool:
        """Return whether part `part` is done, refusing it if it was made from anything else."""
        if not self.part_folder(part).is_dir():
            return False
        _checked_part(self, part)
        return True

    def missing(self) -> list[int]:
        """Return the parts not done yet, refusing a part there that was made from anything else."""
        return [part for part in range(1, self.parts + 1) if not self.done(part)]


def check_parts(parts: int, part: int | None = None) -> None:
    """Refuse a number of parts, or a part of them (1-based, as scheduler array task ids count), that cannot be."""
    if not 1 <= parts <= MAX_PARTS:
        raise SlmError(f"--parts must be between 1 and {MAX_PARTS:,}, got {parts}")
    if part is not None and not 1 <= part <= parts:
        raise SlmError(f"--part must be between 1 and --parts ({parts}), got {part}")


def tokenize_part(job: Job, part: int, documents: Input, tokenizer: PreTrainedTokenizerFast, identity: dict,
                  batch_size: int = 1000, position: int = 0) -> Path:
    """Tokenize part `part` of `documents` (the job's input) into its folder, whole or not at all; return it."""
    dtype = np.dtype(job.dtype)
    lengths = [np.zeros(0, np.int64)]
    mine = documents.part(part, job.parts)
    with partial_folder(job.part_folder(part), shared=True) as folder:
        with open(folder / TOKENS_FILE, "wb") as out, \
                tqdm(total=mine.documents, unit="doc", unit_scale=True, desc=f"part {part} of {job.parts}",
                     position=position, leave=False) as bar:
            for tokens, document_tokens in encoded_streams(tokenizer, mine.batches(batch_size), identity["eos_id"],
                                                           dtype):
                out.write(tokens.tobytes())
                lengths.append(document_tokens)
                bar.update(len(document_tokens))
        np.save(folder / LENGTHS_FILE, np.concatenate(lengths))
        record = {**job.record(part), "documents": sum(map(len, lengths))}
        (folder / PART_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return job.part_folder(part)


def _checked_part(job: Job, part: int) -> np.ndarray:
    """Return part `part`'s document lengths once its record says it is this job's part and its files are whole."""
    folder = job.part_folder(part)
    if not folder.is_dir():
        raise SlmError(f"part {part} of {job.parts} is missing ({folder}): run it (`slm tokenize ... --parts "
                       f"{job.parts} --part {part}`), or `--parts {job.parts}` without --merge to run what is missing")
    try:
        record = mapping(read_json(folder / PART_RECORD, "part record"), str(folder / PART_RECORD))
        lengths = np.load(folder / LENGTHS_FILE, allow_pickle=False)
        size = (folder / TOKENS_FILE).stat().st_size
    except (OSError, ValueError) as e:
        raise SlmError(f"part {part} of {job.parts} in {folder} is incomplete ({describe_error(e)}): remove "
                       f"{folder} to tokenize that part again") from e
    for key, value in job.record(part).items():
        if record.get(key) != value:
            raise SlmError(f"part {part} of {job.parts} in {folder} was made from "
                           f"{MADE_FROM.get(key, f'another {key}')} ({key} {record.get(key)!r} there, {value!r} "
                           f"now): remove {job.folder} to tokenize every part again")
    if lengths.ndim != 1 or len(lengths) != record.get("documents") or (lengths < 1).any() \
            or size != int(lengths.sum()) * np.dtype(job.dtype).itemsize:
        raise SlmError(f"part {part} of {job.parts} in {folder}: its {TOKENS_FILE} and {LENGTHS_FILE} do not agree "
                       f"with its record: remove {folder} to tokenize that part again")
    return lengths


def _part_streams(job: Job, running: Running | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield the parts' token streams in order, `MERGE_DOCUMENTS` documents at a time, with their lengths; a part
    still `running` once it is done."""
    for part in range(1, job.parts + 1):
        if running is not None:
            running.wait(part)
        lengths = _checked_part(job, part)
        dtype = np.dtype(job.dtype)
        ends = np.concatenate([[0], np.cumsum(lengths)])
        path = job.part_folder(part) / TOKENS_FILE
        tokens = np.memmap(path, dtype=dtype, mode="r") if ends[-1] else np.zeros(0, dtype)
        for first in range(0, len(lengths), MERGE_DOCUMENTS):
            last = min(first + MERGE_DOCUMENTS, len(lengths))
            yield np.array(tokens[ends[first]:ends[last]]), lengths[first:last]


def merge_parts(job: Job, identity: dict, *, out_remote: str | None = None, compression: str | None = "zstd",
                overwrite: bool = False, running: Running | None = None) -> ShardStats:
    """Write the output folder from every part, as one process would have written it; then remove the parts.
    `running`: parts still being tokenized (`parts_running`), each merged once it is done, while later ones run."""
    for part in range(1, job.parts + 1):
        if running is None or part not in running.parts:
            _checked_part(job, part)  # every refusal of a part made before, before anything is written
    stats = write_streams(_part_streams(job, running), identity, job.seq_len, out_dir=job.out_dir,
                          out_remote=out_remote, compression=compression, overwrite=overwrite,
                          total_docs=job.documents, source=job.source, desc=f"Merging {job.parts} parts")
    shutil.rmtree(job.folder, ignore_errors=True)
    return stats


def _run_part(job: Job, part: int, input_args: tuple, tokenizer_args: tuple, identity: dict, batch_size: int,
              position: int) -> int:
    """Tokenize one part in a process of its own (the pool's), loading the input and the tokenizer again: the same
    input (its fingerprint and size are the job's) and tokenizer (its content hash)."""
    from slm.data.documents import open_input
    from slm.data.tokenizer import load_tokenizer

    documents = open_input(*input_args)
    if (documents.fingerprint, documents.documents) != (job.fingerprint, job.documents):
        raise SlmError(f"{input_args[0]} changed while its parts were being tokenized: run again")
    tokenizer = load_tokenizer(*tokenizer_args, content_hash=identity["content_hash"])
    tokenize_part(job, part, documents, tokenizer, identity, batch_size, position)
    return part


def _start_worker(workers: int) -> None:
    """Set up a part process: Ctrl-C is the parent's to handle (it stops the workers), and the Rust tokenizer's
    threads get an equal share of the cores (set before its thread pool starts)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
    os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_CPUS"] = threads


class Running:
    """Parts being tokenized by a pool of processes: `wait(part)` returns once that part is done, and raises, naming
    the part, as soon as any part has failed."""

    def __init__(self, results: dict[int, AsyncResult]):
        self.results = results

    @property
    def parts(self) -> list[int]:
        """The parts being tokenized."""
        return list(self.results)

    def wait(self, part: int) -> None:
        """Return once part `part` is done (at once if it is not running here); raise as soon as any part has failed."""
        if part not in self.results:
            return
        while not self.results[part].ready():
            self._raise_a_failure()
            self.results[part].wait(1)
        self._raise_a_failure()

    def _raise_a_failure(self) -> None:
        """Raise an SlmError naming a part that has failed, with its error; nothing while none has."""
        for part, result in self.results.items():
            if result.ready() and not result.successful():
                try:
                    result.get()
                except Exception as e:
                    raise SlmError(f"part {part} failed: {describe_error(e)}") from e


@contextmanager
def parts_running(job: Job, parts: list[int], input_args: tuple, tokenizer_args: tuple, identity: dict,
                  batch_size: int) -> Iterator[Running]:
    """Tokenize `parts` side by side, a process each (at most one a core this process may use), in order; yield them
    running, so the merge can take a part as soon as it is done. On any error or Ctrl-C the workers are stopped
    (a part stopped leaves its `.partial` folder, removed with the parts). `input_args` are `open_input`'s,
    `tokenizer_args` `load_tokenizer`'s."""
    if not parts:
        yield Running({})
        return
    workers = min(len(parts), len(os.sched_getaffinity(0)))
    pool = get_context("spawn").Pool(workers, initializer=_start_worker, initargs=(workers,))
    try:
        yield Running({part: pool.apply_async(_run_part, (job, part, input_args, tokenizer_args, identity,
                                                           batch_size, 1 + i % workers))
                       for i, part in enumerate(parts)})
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


def new_job(source: dict[str, Any], documents: Input, identity: dict, seq_len: int, parts: int, out_dir: Path) -> Job:
    """Return the job of tokenizing `documents` in `parts` parts into `out_dir`; refuse more parts than a streamed
    input has files."""
    if documents.streamed and parts > documents.files:
        raise SlmError(f"{documents.source} has {documents.files} file{'s' * (documents.files != 1)}: a streamed "
                       f"input's parts are runs of its files, so give --parts {documents.files} or fewer")
    return Job(source, documents.fingerprint, documents.documents, documents.files, identity["content_hash"],
               token_dtype(identity["vocab_size"]).name, seq_len, parts, out_dir)
