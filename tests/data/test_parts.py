"""`slm tokenize --parts N` (slm/data/parts.py): the folder one process writes, byte for byte, from N parts run side
by side or one at a time as array tasks; finished parts kept, a killed one redone, a foreign one refused."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from helpers import (
    assert_bitwise_equal,
    edited_tokenizer,
    final_state,
    resumed_at,
    run_slm,
    swap_a_b,
    train,
    write_yaml,
)

pytestmark = pytest.mark.train  # several tokenize runs each


@pytest.fixture(scope="module")
def uneven_corpus(tmp_path_factory, corpus) -> Path:
    """The session corpus with empty documents in it, 403 documents: parts of 3 and 5 are uneven."""
    lines = corpus.read_text().splitlines()
    empty = json.dumps({"story": ""})
    path = tmp_path_factory.mktemp("uneven") / "stories.jsonl"
    path.write_text("\n".join([empty, *lines[:200], empty, *lines[200:], empty]) + "\n")
    return path


def tokenize(corpus: Path, tokenizer: Path, out: Path, *extra: str, seq_len: int = 64, check: bool = True):
    return run_slm("tokenize", "-i", str(corpus), "-f", "story", "-t", str(tokenizer), "-l", str(seq_len),
                   "--out-dir", str(out), *extra, check=check)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, uneven_corpus, tokenizer_dir) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("one") / "mds"
    tokenize(uneven_corpus, tokenizer_dir, out, "--batch-size", "37")
    return files(out)


def assert_same_folder(out: Path, expected: dict[str, bytes]) -> None:
    got = files(out)
    assert sorted(got) == sorted(expected)
    assert [name for name in got if got[name] != expected[name]] == []
    assert not out.with_name(out.name + ".parts").exists()  # the parts are gone once merged


@pytest.mark.parametrize("parts", [2, 5])
def test_parts_side_by_side_write_what_one_process_writes(parts, uneven_corpus, tokenizer_dir, one_process,
                                                          tmp_path):
    out = tmp_path / "mds"
    proc = tokenize(uneven_corpus, tokenizer_dir, out, "--parts", str(parts))
    assert f"tokenizing {parts} of {parts} parts (403 documents in all)" in proc.stderr
    assert_same_folder(out, one_process)


@pytest.mark.parametrize("parts", [1, 3])
def test_parts_as_array_tasks_then_a_merge_write_what_one_process_writes(parts, uneven_corpus, tokenizer_dir,
                                                                         one_process, tmp_path):
    out = tmp_path / "mds"
    for part in reversed(range(1, parts + 1)):  # tasks end in any order
        tokenize(uneven_corpus, tokenizer_dir, out, "--parts", str(parts), "--part", str(part))
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "mds.parts").iterdir()) == [f"part-{p}-of-{parts}"
                                                                          for p in range(1, parts + 1)]
    tokenize(uneven_corpus, tokenizer_dir, out, "--parts", str(parts), "--merge")
    assert_same_folder(out, one_process)


def test_empty_parts_write_what_one_process_writes(tokenizer_dir, corpus, tmp_path):
    """Three documents in five parts: two parts hold none."""
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(corpus.read_text().splitlines()[:3]) + "\n")
    tokenize(small, tokenizer_dir, tmp_path / "one", seq_len=16)
    for part in range(1, 6):
        tokenize(small, tokenizer_dir, tmp_path / "mds", "--parts", "5", "--part", str(part), seq_len=16)
    lengths = [json.loads((tmp_path / "mds.parts" / f"part-{p}-of-5" / "part.json").read_text())
               for p in range(1, 6)]
    assert [r["end"] - r["start"] for r in lengths] == [0, 1, 0, 1, 1]
    tokenize(small, tokenizer_dir, tmp_path / "mds", "--parts", "5", "--merge", seq_len=16)
    assert_same_folder(tmp_path / "mds", files(tmp_path / "one"))


def test_finished_parts_are_kept_and_a_killed_one_is_redone(uneven_corpus, tokenizer_dir, one_process, tmp_path):
    out = tmp_path / "mds"
    for part in (1, 3):
        tokenize(uneven_corpus, tokenizer_dir, out, "--parts", "3", "--part", str(part))
    killed = tmp_path / "mds.parts" / ".part-2-of-3.partial.h2.4242"  # what a part killed while it wrote leaves
    killed.mkdir()
    (killed / "tokens.bin").write_bytes(b"\x01\x02half a part")
    proc = tokenize(uneven_corpus, tokenizer_dir, out, "--parts", "3")
    assert "tokenizing 1 of 3 parts" in proc.stderr  # parts 1 and 3 were kept, not made again
    assert_same_folder(out, one_process)
    assert not killed.exists()


BAD_MERGES = {
    "a part missing": (lambda ws: None, "part 2 of 3 is missing ({ws}/mds.parts/part-2-of-3): run it"),
    "a part of another seq_len": (lambda ws: ["-l", "32"], "part 2 of 3 in {ws}/mds.parts/part-2-of-3 was made "
                                                           "from another seq_len (seq_len 32 there, 64 now)"),
    "a part of another tokenizer": (lambda ws: ["-t", f"{ws}/swapped"], "part 2 of 3 in {ws}/mds.parts/part-2-of-3 "
                                                                        "was made from another tokenizer"),
    "a part of other input": (lambda ws: ["-i", f"{ws}/edited.jsonl"], "part 2 of 3 in {ws}/mds.parts/part-2-of-3 "
                                                                       "was made from another input"),
}


@pytest.mark.parametrize("name", list(BAD_MERGES))
def test_a_merge_refuses_a_part_missing_or_made_from_anything_else(name, uneven_corpus, tokenizer_dir, tmp_path):
    edit, message = BAD_MERGES[name]
    edited_tokenizer(tokenizer_dir, tmp_path / "swapped", swap_a_b)
    (tmp_path / "edited.jsonl").write_text(uneven_corpus.read_text().replace("the", "a"))
    out = tmp_path / "mds"
    for part in (1, 3):
        tokenize(uneven_corpus, tokenizer_dir, out, "--parts", "3", "--part", str(part))
    override = edit(tmp_path)
    if override is not None:  # part 2 made with one thing changed
        argv = ["tokenize", "-i", str(uneven_corpus), "-f", "story", "-t", str(tokenizer_dir), "-l", "64",
                "--out-dir", str(out), "--parts", "3", "--part", "2"]
        for flag, value in zip(override[::2], override[1::2], strict=True):
            argv[argv.index(flag) + 1] = value
        run_slm(*argv)
    before = {p: p.read_bytes() for p in (tmp_path / "mds.parts").rglob("*") if p.is_file()}
    proc = tokenize(uneven_corpus, tokenizer_dir, out, "--parts", "3", "--merge", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"slm tokenize: error: {message.format(ws=tmp_path)}"), lines[0]
    assert not out.exists()
    assert {p: p.read_bytes() for p in (tmp_path / "mds.parts").rglob("*") if p.is_file()} == before


def test_a_changed_input_is_refused_when_its_parts_are_merged(uneven_corpus, tokenizer_dir, tmp_path):
    corpus = tmp_path / "stories.jsonl"
    corpus.write_text(uneven_corpus.read_text())
    out = tmp_path / "mds"
    tokenize(corpus, tokenizer_dir, out, "--parts", "2", "--part", "1")
    corpus.write_text(uneven_corpus.read_text().replace("the", "a"))  # edited after part 1 ran
    tokenize(corpus, tokenizer_dir, out, "--parts", "2", "--part", "2")
    proc = tokenize(corpus, tokenizer_dir, out, "--parts", "2", "--merge", check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert f"part 1 of 2 in {out}.parts/part-1-of-2 was made from other input" in proc.stderr
    assert not out.exists()


def test_a_part_that_fails_stops_the_run_in_one_line_naming_it(uneven_corpus, tokenizer_dir, tmp_path):
    (tmp_path / "mds.parts").write_text("a file where the parts would go")
    proc = tokenize(uneven_corpus, tokenizer_dir, tmp_path / "mds", "--parts", "2", check=False)
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert re.fullmatch(rf"slm tokenize: error: part [12] failed: cannot write to {tmp_path}/mds.parts/part-[12]-of-2"
                        r": .*", lines[0]), lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "mds").exists()


@pytest.mark.parametrize("argv, message", [
    (["--parts", "0"], "--parts must be between 1 and 100,000, got 0"),
    (["--parts", "3", "--part", "4"], "--part must be between 1 and --parts (3), got 4"),
    (["--part", "1"], "--part and --merge are steps of --parts N: give --parts too"),
    (["--parts", "2", "--part", "1", "--merge"], "give --part P (tokenize one part) or --merge (merge them all), "
                                                 "not both"),
])
def test_bad_parts_arguments(argv, message, uneven_corpus, tokenizer_dir, tmp_path):
    proc = tokenize(uneven_corpus, tokenizer_dir, tmp_path / "mds", *argv, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"slm tokenize: error: {message}"]


@pytest.mark.parametrize("stream", [False, True])
def test_check_reads_the_first_document_and_writes_nothing(stream, corpus_files, tokenizer_dir, tmp_path):
    """`--check` (what the job scripts run before they submit): good arguments pass, a bad one fails in one line."""
    streamed = ["--stream"] if stream else []
    proc = tokenize(corpus_files, tokenizer_dir, tmp_path / "mds", *streamed, "--parts", "4", "--check")
    assert "checked: the tokenizer (512 tokens)" in proc.stdout
    for argv, message in ((["-f", "text"], "feature 'text' is not a column of"),
                          (["-s", "validation[:5]"], "validation"),
                          (["--parts", "5"], "has 4 files: a streamed input's parts are runs of its files")):
        if argv[0] == "--parts" and not stream:
            continue  # a loaded input's parts are ranges of documents: any number
        proc = tokenize(corpus_files, tokenizer_dir, tmp_path / "mds", *streamed, "--parts", "4", *argv, "--check",
                        check=False)
        assert proc.returncode == 1 and message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory, uneven_corpus) -> str:
    """The uneven corpus as 4 files of uneven sizes, one of them gzip-compressed: a glob, read in sorted order."""
    lines = uneven_corpus.read_text().splitlines(keepends=True)
    root = tmp_path_factory.mktemp("files")
    for name, chunk in (("a.jsonl", lines[:10]), ("b.jsonl.gz", lines[10:200]), ("c.jsonl", lines[200:201]),
                        ("d.jsonl", lines[201:])):
        (root / name).write_bytes(gzip.compress("".join(chunk).encode()) if name.endswith(".gz")
                                  else "".join(chunk).encode())
    return str(root / "*.jsonl*")


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_a_streamed_input_in_parts_writes_what_one_process_writes(parts, corpus_files, tokenizer_dir, tmp_path):
    """Streamed (`--stream`: no document count before reading), a part is a contiguous run of the input's files: side
    by side, or as array tasks and a merge, the folder of one process that loaded the files whole."""
    tokenize(corpus_files, tokenizer_dir, tmp_path / "one")
    out = tmp_path / "mds"
    if parts == 3:
        for part in (3, 1, 2):
            tokenize(corpus_files, tokenizer_dir, out, "--stream", "--parts", "3", "--part", str(part))
        records = [json.loads((tmp_path / "mds.parts" / f"part-{p}-of-3" / "part.json").read_text())
                   for p in (1, 2, 3)]
        assert [r["documents"] for r in records] == [200, 1, 202]  # a+b, c, d: as `datasets` divides 4 files
        tokenize(corpus_files, tokenizer_dir, out, "--stream", "--parts", "3", "--merge")
    else:
        proc = tokenize(corpus_files, tokenizer_dir, out, "--stream", "--parts", str(parts))
        assert f"tokenizing {parts} of {parts} parts (4 files in all)" in proc.stderr
    assert_same_folder(out, files(tmp_path / "one"))


def test_a_streamed_file_changed_between_its_parts_is_refused(corpus_files, tokenizer_dir, tmp_path):
    shutil.copytree(Path(corpus_files).parent, tmp_path / "in")
    pattern = str(tmp_path / "in" / "*.jsonl*")
    out = tmp_path / "mds"
    tokenize(pattern, tokenizer_dir, out, "--stream", "--parts", "2", "--part", "1")
    with open(tmp_path / "in" / "d.jsonl", "a") as f:  # a file of the other part, grown after part 1 ran
        f.write(json.dumps({"story": "One more."}) + "\n")
    proc = tokenize(pattern, tokenizer_dir, out, "--stream", "--parts", "2", check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"part 1 of 2 in {out}.parts/part-1-of-2 was made from other input" in proc.stderr
    assert not out.exists() and (tmp_path / "mds.parts" / "part-1-of-2").is_dir()


@pytest.mark.parametrize("argv, message", [
    (["--stream", "--parts", "5"], "{glob} has 4 files: a streamed input's parts are runs of its files, so give "
                                   "--parts 4 or fewer"),
    (["--stream", "--parts", "2", "--max-docs", "10"], "--max-docs and --parts do not go together on a streamed "
                                                       "input"),
    (["--stream", "-s", "train[:10%]"], "a streamed input takes a split's name, not 'train[:10%]'"),
])
def test_bad_streamed_arguments(argv, message, corpus_files, tokenizer_dir, tmp_path):
    proc = tokenize(corpus_files, tokenizer_dir, tmp_path / "mds", *argv, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"slm tokenize: error: {message.format(glob=corpus_files)}")
    assert not list(tmp_path.iterdir())


def test_a_corpus_no_one_here_wrote_in_streamed_parts_trains_and_resumes_bitwise(foreign_corpus, tokenizer_dir,
                                                                                 shards, tmp_path):
    """Python's reference documentation in 3 streamed parts: the folder one process writes, byte for byte; a run on
    it whose checkpoints after batch 8 are lost resumes there and ends bitwise equal to one never stopped."""
    tokenize(foreign_corpus, tokenizer_dir, tmp_path / "one", "-f", "text")
    tokenize(foreign_corpus, tokenizer_dir, tmp_path / "mds", "-f", "text", "--stream", "--parts", "3")
    assert_same_folder(tmp_path / "mds", files(tmp_path / "one"))
    config = write_yaml(tmp_path / "foreign.yaml", shards)
    on_it = f"data.train.local={tmp_path / 'mds'}"
    train(config, "run_name=straight", on_it)
    straight = tmp_path / "ckpt" / "straight"
    stopped = tmp_path / "ckpt" / "stopped"
    shutil.copytree(straight, stopped, symlinks=True)
    for path in [*stopped.glob("ep0-ba12-*"), *stopped.glob("ep0-ba16-*"), stopped / "latest-rank0.pt"]:
        path.unlink()
    assert resumed_at(train(config, "run_name=stopped", on_it)) == 8
    assert_bitwise_equal(final_state(straight), final_state(stopped))


def test_a_part_written_twice_keeps_the_first_writers_folder(tmp_path):
    """Two writers of one part (a resubmission while the first still runs): the one done first is kept whole."""
    from slm.core.paths import partial_folder

    part = tmp_path / "mds.parts" / "part-1-of-2"
    part.mkdir(parents=True)
    (part / "tokens.bin").write_bytes(b"first writer")
    with partial_folder(part, shared=True) as folder:
        assert folder != part and folder.parent == part.parent
        (folder / "tokens.bin").write_bytes(b"second writer")
    assert (part / "tokens.bin").read_bytes() == b"first writer"
    assert sorted(p.name for p in part.parent.iterdir()) == ["part-1-of-2"]
