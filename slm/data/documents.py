"""Reading input documents for `slm tokenizer` and `slm tokenize`, all through `datasets`.

`-i` may be a local file (txt, BabyLM's .train/.dev/.test, json/jsonl, parquet, csv, arrow, optionally
compressed), a glob of such files (read in sorted order), a folder of them, a `save_to_disk` folder, a Hub dataset id,
or a URL fsspec reads; `-s` takes the `datasets` split syntax, slicing included (`train[:95%]`). Loaded whole
(`load_documents`: `datasets` prepares the input once, in its cache) or streamed (`open_input(..., stream=True)`:
read as it goes, nothing downloaded or prepared whole; a URL always is).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
from datasets.arrow_writer import SchemaInferenceError

from slm.core.errors import Refused, SlmError
from slm.core.foreign import checked_folder
from slm.core.paths import is_local_path

BABYLM = (".train", ".dev", ".test")  # BabyLM's text files: a sentence or utterance a line
BUILDERS = {".txt": "text", ".text": "text", **dict.fromkeys(BABYLM, "text"), ".json": "json", ".jsonl": "json",
            ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip"}
TXT_DOCUMENTS = {"line": "line", "paragraph": "paragraph", "file": "document"}  # --txt-by: datasets' sample_by


def _builder(path: Path) -> str:
    """Return the `datasets` builder of a file, by its last suffix that is no compression's; refuse an unknown type."""
    suffixes = [s for s in path.suffixes if s not in COMPRESSIONS]
    builder = BUILDERS.get(suffixes[-1].lower()) if suffixes else None
    if builder is None:
        raise SlmError(f"{path}: unknown file type; use one of {', '.join(sorted(BUILDERS))}")
    return builder


def _glob_files(pattern: str) -> list[Path]:
    """Return the files a glob names, sorted (the documents' order), all of one type; refuse none or a mix."""
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())
    if not files:
        raise SlmError(f"no file matches {pattern}: give a file, a folder, a glob that matches, or a Hub dataset id")
    builders = {_builder(file) for file in files}
    if len(builders) > 1:
        raise SlmError(f"{pattern} matches files of {len(builders)} types ({', '.join(sorted(builders))}): give a "
                       "glob of one type, e.g. '*.jsonl'")
    return files


def _first_bad_utf8(files: list[Path]) -> str:
    """Return where the first invalid UTF-8 of `files` is (file, line, byte), or "an input file" where none is found."""
    for file in files:
        with open(file, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"{file} line {number}, byte {e.start + 1}"
    return "an input file"


def _select_split(ds: datasets.Dataset | datasets.DatasetDict, split: str, source: str) -> datasets.Dataset:
    """Apply `datasets` split syntax (names, slices, `+`) to a dataset loaded from disk."""
    splits = ds if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    try:
        instructions = datasets.ReadInstruction.from_spec(split).to_absolute(
            {name: len(d) for name, d in splits.items()})
    except (ValueError, AssertionError) as e:
        raise SlmError(f"bad split '{split}' for {source}: {e}") from e
    parts = [splits[i.splitname].select(range(i.from_, i.to)) for i in instructions]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def is_url(source: str) -> bool:
    """Return whether `-i` names a URL (hf://, s3://, https://, file://...), which is always read streamed."""
    return "://" in source


def reads_streamed(source: str, stream: bool) -> bool:
    """Return whether `source` is read streamed: asked (`--stream`), or a URL."""
    return stream or is_url(source)


def _names_a_file(source: str) -> bool:
    """Return whether `source` can only be a local path (a file's name is no Hub dataset id): one that is not there
    is 'not found', not a download."""
    return is_local_path(source) or bool(set(Path(source).suffixes) & set(BUILDERS))


def _file_builder(files: list[Path], txt_by: str | None) -> tuple[str, dict, str]:
    """Return the `datasets` builder of files of one type, its arguments, and what a document of a text file is: as
    asked, else a blank-line block in BabyLM's files, else a line."""
    builder = _builder(files[0])
    if txt_by is None:
        txt_by = "paragraph" if any(set(file.suffixes) & set(BABYLM) for file in files) else "line"
    return builder, {"sample_by": TXT_DOCUMENTS[txt_by]} if builder == "text" else {}, txt_by


def _refuse_empty(source: str, files: list[Path]) -> None:
    """Refuse an input whose files are all empty: there is no document to read."""
    if files and all(file.is_file() and file.stat().st_size == 0 for file in files):
        raise SlmError(f"{source} is empty: there are no documents to read")


def _folder_kwargs(txt_by: str | None) -> dict:
    """Return what `datasets` needs to read a folder: what a document of its text files is, if asked."""
    return {"sample_by": TXT_DOCUMENTS[txt_by]} if txt_by else {}


def _input_files(source: str) -> tuple[Path, list[Path]]:
    """Return a local input's path and its files (the glob's, or the path itself), once none of a folder or a glob
    leads outside it (docs/security.md: a corpus may be someone else's, a file in it a link to one of yours)."""
    path = Path(source).expanduser()
    if not (glob.has_magic(source) and not path.exists()):
        checked_folder(path, "corpus folder")
        return path, [path]
    files = _glob_files(source)
    base = Path(os.path.expanduser(source))
    while glob.has_magic(str(base)):
        base = base.parent
    for file in files:  # what the glob matched, not the whole folder it starts at
        if not file.resolve().is_relative_to(base.resolve()):
            raise Refused(f"{source} matches {file}, which leads to {file.resolve()}, outside {base}: slm reads only "
                          "inside a folder from elsewhere (docs/security.md); put the file itself there", str(file))
    return path, files


@contextmanager
def _reading(source: str, split: str, files: list[Path]) -> Iterator[None]:
    """Turn what `datasets` raises while loading or reading `source` into one line saying what to do."""
    try:
        yield
    except SlmError:
        raise
    except (datasets.exceptions.DatasetGenerationError, UnicodeDecodeError) as e:
        if isinstance(e, UnicodeDecodeError) or isinstance(e.__cause__, UnicodeDecodeError):
            local = [p for f in files for p in ([f] if f.is_file() else sorted(f.rglob("*"))) if p.is_file()]
            raise SlmError(f"input is not valid UTF-8: {_first_bad_utf8(local)}; "
                           "re-encode it (e.g. iconv -t utf-8) or remove the bad bytes") from e
        if isinstance(e.__cause__, SchemaInferenceError):
            raise SlmError(f"{source} has no documents") from None  # the cause adds nothing
        raise SlmError(f"cannot read {source}: {e.__cause__ or e}") from e
    except StopIteration:  # what the json builder raises for files without a single record
        raise SlmError(f"{source} has no documents") from None  # the cause adds nothing
    except ValueError as e:  # unknown split, bad slice, unparsable file
        raise SlmError(f"cannot read '{split}' of {source}: {e}") from e
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise SlmError(f"cannot load '{source}'{offline}: {_first_line(e)}") from e
    except (OSError, ImportError) as e:  # a file unreadable or not what its name says; no s3fs for s3://
        raise SlmError(f"cannot read {source}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    """Return the first line of an error's message, or its type's name where it has none."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_documents(source: str, feature: str, split: str = "train", txt_by: str | None = None
                   ) -> datasets.Dataset:
    """Load the `feature` column of `source`'s `split` as a (memory-mapped) Dataset. `txt_by`: what a text file's
    document is (`TXT_DOCUMENTS`; by default a line, or a blank-line block in BabyLM's files)."""
    path, files = _input_files(source)
    _refuse_empty(source, files)
    with _reading(source, split, files):
        if all(file.is_file() for file in files):
            builder, kwargs, txt_by = _file_builder(files, txt_by)
            ds = datasets.load_dataset(builder, data_files=[str(file) for file in files], split=split, **kwargs)
        elif path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            ds = _select_split(datasets.load_from_disk(str(path)), split, source)
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), split=split, **_folder_kwargs(txt_by))
        elif _names_a_file(source):
            raise SlmError(f"input not found: {source} (give a file, a folder, or a Hub dataset id)")
        else:
            ds = datasets.load_dataset(source, split=split)
    return _text_column(ds, feature, source, txt_by)


def _text_column(ds: datasets.Dataset | datasets.IterableDataset, feature: str, source: str, txt_by: str | None
                 ) -> datasets.Dataset | datasets.IterableDataset:
    """Keep the `feature` column alone, refusing a dataset without it; drop a text input's blank documents, and the
    line breaks around a blank-line block (`datasets` leaves a file's last line break on its last block)."""
    columns = ds.column_names
    if columns is None:  # a streamed input whose features are known only once read
        first = next(iter(ds), None)
        if first is None:
            raise SlmError(f"{source} has no documents")
        columns = list(first)
    if feature not in columns:
        raise SlmError(f"feature '{feature}' is not a column of {source}; columns: {', '.join(columns) or 'none'}")
    ds = ds.select_columns([feature])
    loaded = isinstance(ds, datasets.Dataset)
    if ds.info.builder_name == "text" and txt_by == "paragraph":
        ds = ds.map(lambda b: {feature: [t.strip("\n") for t in b[feature]]}, batched=True,
                    **({"desc": "Trimming blank-line blocks"} if loaded else {}))
    if ds.info.builder_name == "text" and txt_by != "file":  # a blank line or block is no document
        ds = ds.filter(lambda b: [bool(t.strip()) for t in b[feature]], batched=True,
                       **({"desc": "Dropping blank lines"} if loaded else {}))
    return ds


def _stream(source: str, feature: str, split: str, txt_by: str | None) -> Input:
    """Open `source` streamed: its files read in order as the documents are asked for, nothing prepared whole."""
    if "[" in split or "+" in split:
        raise SlmError(f"a streamed input takes a split's name, not '{split}': give --max-docs N for its first N "
                       "documents")
    url = is_url(source)
    path, files = (Path(), []) if url else _input_files(source)
    _refuse_empty(source, files)
    with _reading(source, split, files):
        if url or all(file.is_file() for file in files):
            kind, kwargs, txt_by = _file_builder([Path(source.split("?")[0])] if url else files, txt_by)
            builder = datasets.load_dataset_builder(kind, data_files=[source] if url else [str(f) for f in files],
                                                    **kwargs)
        elif path.is_dir():
            builder = datasets.load_dataset_builder(str(path), **_folder_kwargs(txt_by))
        elif _names_a_file(source):
            raise SlmError(f"input not found: {source} (give a file, a folder, a URL, or a Hub dataset id)")
        else:
            builder = datasets.load_dataset_builder(source)
        if split not in (builder.config.data_files or {}):
            known = ", ".join(builder.config.data_files or {}) or "none"
            raise SlmError(f"{source} has no split '{split}' (its splits: {known})")
        resolved = [str(f) for f in builder.config.data_files[split]]
        ds = builder.as_streaming_dataset(split=split)
        stats = [[os.stat(f).st_size, os.stat(f).st_mtime_ns] if os.path.isfile(f) else None for f in resolved]
        identity = {"source": source, "split": split, "config": builder.config.name, "files": resolved,
                    "stats": stats, "txt_by": txt_by}
        fingerprint = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
        return Input(_text_column(ds, feature, source, txt_by), feature, fingerprint, None, ds.n_shards, source,
                     split, tuple(files))


@dataclass(frozen=True)
class Input:
    """The documents `slm tokenizer` and `slm tokenize` read: loaded whole, or streamed."""

    data: datasets.Dataset | datasets.IterableDataset
    feature: str
    fingerprint: str  # another file, edit, slice or sample gives another
    documents: int | None  # how many, where known before they are all read (a loaded input)
    files: int | None  # a streamed input's files: its parts are contiguous runs of them
    source: str
    split: str
    local_files: tuple[Path, ...] = ()  # a streamed input's local files, named by an error met reading them

    @property
    def streamed(self) -> bool:
        """Whether the input is read streamed (its document count is unknown until it is read)."""
        return self.documents is None

    def batches(self, batch_size: int = 1000) -> Iterator[list[str]]:
        """Yield the documents in order, `batch_size` at a time."""
        with _reading(self.source, self.split, list(self.local_files)):
            yield from iter_batches(self.data, self.feature, batch_size)

    def head(self, count: int) -> Input:
        """Return the input's first `count` documents (all of them, where it has fewer)."""
        if self.streamed:
            fingerprint = hashlib.sha256(f"{self.fingerprint} first {count}".encode()).hexdigest()[:16]
            return replace(self, data=self.data.take(count), fingerprint=fingerprint)
        data = self.data.select(range(min(count, self.documents)))
        return replace(self, data=data, fingerprint=data._fingerprint, documents=len(data))

    def part(self, part: int, parts: int) -> Input:
        """Return part `part` (1-based) of `parts`: a contiguous range of a loaded input's documents (`part_range`),
        a contiguous run of a streamed one's files (as `datasets` divides them)."""
        if self.streamed:
            return replace(self, data=self.data.shard(parts, part - 1, contiguous=True))
        start, end = part_range(self.documents, parts, part)
        return replace(self, data=self.data.select(range(start, end)), documents=end - start)


def part_range(documents: int, parts: int, part: int) -> tuple[int, int]:
    """Return the documents [start, end) of part `part` (1-based) of `parts`: contiguous, sizes differing by one."""
    return documents * (part - 1) // parts, documents * part // parts


def check_input(source: str, feature: str, split: str = "train", txt_by: str | None = None, stream: bool = False
                ) -> Input:
    """Read the input's first document, streamed where it can be (a saved dataset is memory-mapped), so that a bad
    path, feature or file is refused in seconds, before jobs are submitted, without preparing the whole input;
    return the input opened so."""
    path = Path(source).expanduser()
    saved = path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())
    if not reads_streamed(source, stream):  # a slice of a loaded input is checked when the jobs read it
        split = re.split(r"[\[+]", split)[0]
    documents = open_input(source, feature, split, txt_by, stream=not saved, max_docs=1)
    next(documents.batches(1), None)
    return documents


def open_input(source: str, feature: str, split: str = "train", txt_by: str | None = None, stream: bool = False,
               max_docs: int | None = None) -> Input:
    """Open `source`'s documents: loaded whole, or streamed (asked, or a URL); only the first `max_docs`, if given."""
    if max_docs is not None and max_docs < 1:
        raise SlmError(f"--max-docs must be at least 1, got {max_docs}")
    if txt_by is not None and txt_by not in TXT_DOCUMENTS:
        raise SlmError(f"--txt-by takes {', '.join(TXT_DOCUMENTS)}, not '{txt_by}'")
    if reads_streamed(source, stream):
        opened = _stream(source, feature, split, txt_by)
    else:
        ds = load_documents(source, feature, split, txt_by)
        opened = Input(ds, feature, ds._fingerprint, len(ds), None, source, split)
    return opened if max_docs is None else opened.head(max_docs)


def iter_batches(ds: datasets.Dataset, feature: str, batch_size: int = 1000) -> Iterator[list[str]]:
    """Yield documents in order, `batch_size` at a time; None counts as an empty document."""
    for batch in ds.iter(batch_size=batch_size):
        texts = batch[feature]
        if any(not isinstance(t, str) for t in texts):
            bad = next(t for t in texts if t is not None and not isinstance(t, str))
            if bad is not None:
                raise SlmError(f"feature '{feature}' holds {type(bad).__name__} values, not text")
            texts = [t or "" for t in texts]
        yield texts
