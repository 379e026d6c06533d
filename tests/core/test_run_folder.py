"""A run folder's files read without torch (slm/core/run_folder.py): the storage-size table against torch's own,
whole and torn checkpoints of every dtype a state may hold, metrics.jsonl rows and their one-line error."""

from __future__ import annotations

import warnings

import pytest
import torch

from slm.core.errors import SlmError
from slm.core.run_folder import METRICS, STORAGE_ITEMSIZE, is_complete, read_metrics


def test_the_storage_sizes_are_torchs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated
        torchs = {name: getattr(torch, name).dtype.itemsize for name in STORAGE_ITEMSIZE if name != "UntypedStorage"}
    assert torchs == {name: size for name, size in STORAGE_ITEMSIZE.items() if name != "UntypedStorage"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool,
                                   torch.float8_e4m3fn, torch.complex64], ids=str)
def test_a_checkpoint_is_whole_until_a_byte_is_cut(tmp_path, dtype):
    path = tmp_path / "ep0-ba1-rank0.pt"
    torch.save({"state": {"model": {"w": torch.ones(64, 3).to(dtype), "step": torch.tensor(3)}}}, path)
    assert is_complete(path)
    data = path.read_bytes()
    path.write_bytes(data[:-1])  # the zip's end, as a kill leaves it
    assert not is_complete(path)


def test_metrics_rows_and_a_line_that_is_not_json(tmp_path):
    assert read_metrics(tmp_path) == []
    (tmp_path / METRICS).write_text('{"batch": 1}\n\n{"batch": 2}\n')
    assert read_metrics(tmp_path) == [{"batch": 1}, {"batch": 2}]
    (tmp_path / METRICS).write_text('{"batch": 1}\n{"batch": \n')
    with pytest.raises(SlmError, match="metrics.jsonl, line 2 is not valid JSON"):
        read_metrics(tmp_path)
