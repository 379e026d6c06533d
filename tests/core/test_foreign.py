"""The one way slm reads from elsewhere (slm/core/foreign.py, slm/core/shard_index.py, the checkpoint gate's layout
check): each rule on small files made here, each refusal one line. The hostile-input harness
(tests/test_hostile_inputs.py) tries them through every command."""

from __future__ import annotations

import json
import os
import zipfile

import pytest

from slm.core.errors import Refused, SlmError
from slm.core.foreign import (
    checked_file,
    checked_folder,
    count,
    plain_name,
    read_bytes,
    read_json,
    read_yaml,
    stored_members,
    text,
)
from slm.core.shard_index import MAX_EXPANSION, checked_index


@pytest.fixture
def folder(tmp_path):
    """A folder from elsewhere, and a file of yours outside it."""
    (tmp_path / "yours.txt").write_text("yours")
    given = tmp_path / "given"
    (given / "sub").mkdir(parents=True)
    (given / "run.json").write_text("{}")
    (given / "sub" / "ep0-ba1-rank0.pt").write_text("x")
    return given


def test_a_folder_with_links_inside_it_only_is_read(folder, tmp_path):
    (folder / "latest-rank0.pt").symlink_to("sub/ep0-ba1-rank0.pt")
    (folder / "also").symlink_to(folder / "sub")
    (tmp_path / "linked").symlink_to(folder)  # the folder itself a link: yours to make
    assert checked_folder(tmp_path / "linked", "run folder") == tmp_path / "linked"


@pytest.mark.parametrize("how", ["file", "dangling", "folder", "deep", "loop", "through a link inside"])
def test_a_link_leading_out_of_a_folder_is_refused(folder, tmp_path, how):
    {"file": lambda: (folder / "metrics.jsonl").symlink_to(tmp_path / "yours.txt"),
     "dangling": lambda: (folder / ".run.json.partial.json").symlink_to(tmp_path / "not-yet"),
     "folder": lambda: (folder / ".hub-pending").symlink_to(tmp_path),
     "deep": lambda: (folder / "sub" / "x.json").symlink_to("../../yours.txt"),
     "loop": lambda: (folder / "a").symlink_to("a"),
     "through a link inside": lambda: ((folder / "out").symlink_to(tmp_path / "yours.txt"),
                                       (folder / "in").symlink_to("out"))}[how]()
    with pytest.raises(Refused, match=r"^run folder .* holds .*, a link to .*, which leads outside it: slm reads and "
                                      r"writes only inside a folder from elsewhere"):
        checked_folder(folder, "run folder")


def test_a_pipe_in_a_folder_or_as_a_file_is_refused_without_waiting(folder):
    os.mkfifo(folder / "metrics.jsonl")
    with pytest.raises(Refused, match="holds metrics.jsonl, which is no file or folder"):
        checked_folder(folder, "run folder")
    with pytest.raises(Refused, match="is no regular file"):
        read_bytes(folder / "metrics.jsonl", "metrics file")


def test_a_table_named_as_a_file_may_not_lead_out_of_its_folder(folder, tmp_path):
    (folder / "eval.parquet").symlink_to(tmp_path / "yours.txt")
    with pytest.raises(Refused, match="eval table .* is a link to .*, which leads outside its folder"):
        checked_file(folder / "eval.parquet", "eval table")


def test_records_are_bounded_and_parse_errors_are_one_line(tmp_path):
    (tmp_path / "big.json").write_text(" " * 101)
    with pytest.raises(Refused, match="is 101 bytes, more than the 100 of any slm run record"):
        read_bytes(tmp_path / "big.json", "run record", limit=100)
    for name, content in (("deep.json", "[" * 100_000), ("digits.json", "1" * 5000), ("torn.json", '{"a": ')):
        (tmp_path / name).write_text(content)
        with pytest.raises(SlmError, match=rf"run record .*{name} is not valid JSON \(.*\): it is truncated"):
            read_json(tmp_path / name, "run record")


def test_yaml_aliases_are_refused(tmp_path):
    """A few lines of aliases expand to billions of nodes once OmegaConf copies the references."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, "
                                                    f"*{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]
    (tmp_path / "config.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(Refused, match="uses YAML aliases, which slm never writes"):
        read_yaml(tmp_path / "config.yaml", "config")


def test_a_saved_config_names_no_other_file(tmp_path):
    from slm.core.config import load_saved_config

    (tmp_path / "config.yaml").write_text(f"base: {tmp_path / 'yours.yaml'}\n")
    with pytest.raises(Refused, match="names a base yaml .*, which a saved config never does"):
        load_saved_config(tmp_path / "config.yaml")


@pytest.mark.parametrize(("value", "what"), [(-1, "count"), (2**60, "count"), ("7", "count"), (True, "count"),
                                             (None, "count"), ("a\nb", "text"), ("a" * 2000, "text"), (3, "text")])
def test_values_read_from_elsewhere_are_typed_and_bounded(value, what):
    check = {"count": count, "text": text}[what]
    with pytest.raises(Refused, match="run.json: x is .*, not a"):
        check(value, "run.json: x")


@pytest.mark.parametrize("name", ["/abs", "../up", "a/../../b", "", ".", "a\\b", "a\0b", "x" * 300, "a\nb"])
def test_names_that_lead_outside_their_folder_are_refused(name):
    with pytest.raises(Refused, match="which is not a relative path below its folder"):
        plain_name(name, "shard index", below=True)
    assert plain_name("sub/shard.00000.mds", "shard index", below=True) == "sub/shard.00000.mds"


def test_a_compressed_member_is_refused_before_anything_is_read(tmp_path):
    """2 GB of zeros, deflated to a few MB: the checkpoint gate and the document record's reader refuse it."""
    import torch

    from slm.core.trust import unpickle_checkpoint

    torch.save({"state": {"x": torch.zeros(4)}}, tmp_path / "honest.pt")
    assert [m.filename for m in stored_members(tmp_path / "honest.pt", "checkpoint")]
    with zipfile.ZipFile(tmp_path / "honest.pt") as z:
        names = z.namelist()
        members = {n: z.read(n) for n in names}
    with zipfile.ZipFile(tmp_path / "bomb.pt", "w") as z:
        for name in names:
            if name.endswith("/data/0"):
                member = zipfile.ZipInfo(name)
                member.compress_type = zipfile.ZIP_DEFLATED
                with z.open(member, "w", force_zip64=True) as f:
                    for _ in range(128):
                        f.write(bytes(1 << 24))
            else:
                z.writestr(name, members[name])
    assert (tmp_path / "bomb.pt").stat().st_size < 8 * 2**20
    with pytest.raises(Refused, match=r"checkpoint .*bomb.pt: its member '.*/data/0' is compressed \(2,147,483,648 "
                                      r"bytes from"):
        unpickle_checkpoint(tmp_path / "bomb.pt")


def index(samples: int, raw: int, zipped: int | None = None, name: str = "shard.00000.mds") -> dict:
    shard = {"samples": samples, "column_sizes": [128], "raw_data": {"basename": name, "bytes": raw},
             "zip_data": {"basename": f"{name}.zstd", "bytes": zipped} if zipped is not None else None}
    return {"shards": [shard], "version": 2}


def test_an_index_may_not_claim_more_than_its_files_hold(tmp_path):
    """The index counts what Streaming allocates for: samples beyond the bytes of their shard, a declared size other
    than the file's, a compressed shard decompressing past the bound are refused."""
    assert checked_index(index(163, 21716, 6941), tmp_path, "shard index")  # an honest one of the tests' shards
    with pytest.raises(Refused, match="holds 100,000,000 samples, which 21,716 bytes cannot"):
        checked_index(index(10**8, 21716, 6941), tmp_path, "shard index")
    with pytest.raises(Refused, match=rf"decompresses to .*, more than {MAX_EXPANSION} times its size"):
        checked_index(index(10**6, 133 * 10**6, 6941), tmp_path, "shard index")
    (tmp_path / "shard.00000.mds").write_bytes(bytes(100))
    with pytest.raises(SlmError, match="is 100 bytes but index.json says 21716"):
        checked_index(index(163, 21716, 6941), tmp_path, "shard index")
    with pytest.raises(Refused, match="samples is '7', not a whole number"):
        checked_index(json.loads(json.dumps(index(163, 21716)).replace("163", '"7"')), tmp_path, "shard index")
