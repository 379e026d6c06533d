"""Reading input documents for `slm tokenizer` and `slm tokenize`, all through `datasets`.

`-i` may be a local file (txt, json/jsonl, parquet, csv, arrow, optionally compressed),
a glob of such files (read in sorted order), a folder of them, a `save_to_disk` folder, or a
Hub dataset id; `-s` takes the `datasets` split syntax, slicing included (`train[:95%]`).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

import datasets
from datasets.arrow_writer import SchemaInferenceError

from slm.core.errors import SlmError
from slm.core.paths import is_local_path

BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
            ".csv": "csv", ".arrow": "arrow"}
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip"}


def _builder(path: Path) -> str:
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


def load_documents(source: str, feature: str, split: str = "train", txt_per_file: bool = False
                   ) -> datasets.Dataset:
    """Load the `feature` column of `source`'s `split` as a (memory-mapped) Dataset."""
    path = Path(source).expanduser()
    text_kwargs = {"sample_by": "document"} if txt_per_file else {}
    files = _glob_files(source) if glob.has_magic(source) and not path.exists() else [path]
    if all(file.is_file() and file.stat().st_size == 0 for file in files):
        raise SlmError(f"{source} is empty: there are no documents to read")
    try:
        if all(file.is_file() for file in files):
            builder = _builder(files[0])
            ds = datasets.load_dataset(builder, data_files=[str(file) for file in files], split=split,
                                       **(text_kwargs if builder == "text" else {}))
        elif path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            ds = _select_split(datasets.load_from_disk(str(path)), split, source)
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), split=split, **text_kwargs)
        elif is_local_path(source) or source.endswith(tuple(BUILDERS)):  # a file name is no Hub dataset id
            raise SlmError(f"input not found: {source} (give a file, a folder, or a Hub dataset id)")
        else:
            ds = datasets.load_dataset(source, split=split)
    except SlmError:
        raise
    except (datasets.exceptions.DatasetGenerationError, UnicodeDecodeError) as e:
        if isinstance(e, UnicodeDecodeError) or isinstance(e.__cause__, UnicodeDecodeError):
            files = files if files[0].is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            raise SlmError(f"input is not valid UTF-8: {_first_bad_utf8(files)}; "
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
        raise SlmError(f"cannot load '{source}'{offline}: {str(e).splitlines()[0]}") from e
    if feature not in ds.column_names:
        raise SlmError(f"feature '{feature}' is not a column of {source}; columns: {', '.join(ds.column_names)}")
    ds = ds.select_columns([feature])
    if ds.info.builder_name == "text" and not txt_per_file:  # one document per line: blank lines are none
        ds = ds.filter(lambda b: [bool(t.strip()) for t in b[feature]], batched=True, desc="Dropping blank lines")
    return ds


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
