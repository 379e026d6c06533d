"""Evaluating a checkpoint or exported model on MDS shards (`slm eval`): the training metrics, as JSON."""

from __future__ import annotations

from pathlib import Path

import torch
from streaming import StreamingDataset
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from slm.data import check_compatible, check_shards, collate
from slm.errors import SlmError
from slm.export import model_from_checkpoint, read_checkpoint
from slm.metrics import build_metrics, byte_lengths
from slm.model import CausalLM
from slm.shards import read_metadata
from slm.tokenizer import load_tokenizer, mismatch_hint, tokenizer_matches


def load_model(path: Path):
    """(model, tokenizer name) from a checkpoint file of slm/train.py or a `slm export` folder."""
    if path.is_file():
        state = read_checkpoint(path)
        return model_from_checkpoint(state), state["callbacks"]["RunInfo"]["tokenizer"]
    if not (path / "config.json").exists():
        raise SlmError(f"{path} is neither a checkpoint file nor an exported model folder (no config.json)")
    return AutoModelForCausalLM.from_pretrained(path).eval(), str(path)


def evaluate(model_path: Path, data: Path, batch_size: int = 16, max_batches: int | None = None) -> dict:
    """Cross-entropy, perplexity, accuracy and bits per byte of the model on the shards at `data`."""
    model, tokenizer_name = load_model(model_path)
    meta = read_metadata(data)
    check_shards(data)
    tokenizer = load_tokenizer(tokenizer_name)
    if not tokenizer_matches(tokenizer, meta["tokenizer"]):
        raise SlmError(f"{data} was tokenized with {meta['tokenizer']['name']}, not with the model's tokenizer"
                       f"{mismatch_hint(tokenizer, meta['tokenizer'])}")
    check_compatible([(data, meta)], model.config.vocab_size, getattr(model.config, "max_position_embeddings", None))
    metrics = build_metrics(byte_lengths(tokenizer))
    wrapper = CausalLM(model, tokenizer, metrics=metrics)
    loader = DataLoader(StreamingDataset(local=str(data), shuffle=False, batch_size=batch_size),
                        batch_size=batch_size, collate_fn=collate)
    samples = 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            samples += len(batch["input_ids"])
            outputs = wrapper.eval_forward(batch)
            for metric in metrics:
                metric.update(outputs, wrapper.labels)
    result = {type(m).__name__: m.compute().item() for m in metrics}
    return {"model": str(model_path), "data": str(data), "samples": samples, **result}
