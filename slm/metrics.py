"""Language-model metrics (torchmetrics, summed across processes): cross-entropy, perplexity,
next-token accuracy from Composer, and bits per byte.

Bits per byte makes models with different tokenizers comparable: bpb = nats / (ln 2 * bytes),
where bytes = the UTF-8 length of the target tokens. In byte-level BPE every character of a
token's string stands for exactly one byte, so the byte count of a target is a table lookup;
special tokens count 0 bytes.
"""

from __future__ import annotations

import math

import torch
from composer.metrics import LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy
from torchmetrics import Metric
from transformers import PreTrainedTokenizerBase


def byte_lengths(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Bytes each token id stands for (0 for special tokens), indexed by id."""
    vocab = tokenizer.get_vocab()
    table = torch.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.long)
    special = set(tokenizer.all_special_ids)
    decoder = tokenizer.backend_tokenizer.decoder
    byte_level = decoder is not None and "ByteLevel" in decoder.__class__.__name__
    for token, idx in vocab.items():
        if idx in special:
            continue
        table[idx] = len(token) if byte_level else len(tokenizer.convert_tokens_to_string([token]).encode())
    return table


class BitsPerByte(Metric):
    """Cross-entropy in bits per byte of target text."""

    full_state_update = False

    def __init__(self, byte_table: torch.Tensor, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("byte_table", byte_table, persistent=False)
        self.add_state("sum_nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_bytes", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        target = target.reshape(-1)
        mask = target != self.ignore_index
        nats = torch.nn.functional.cross_entropy(logits.reshape(target.shape[0], -1).float(), target,
                                                 ignore_index=self.ignore_index, reduction="sum")
        self.sum_nats += nats.double()
        self.sum_bytes += self.byte_table.to(target.device)[target[mask]].sum()

    def compute(self) -> torch.Tensor:
        return (self.sum_nats / (math.log(2) * self.sum_bytes.clamp(min=1))).float()


def build_metrics(byte_table: torch.Tensor) -> list[Metric]:
    return [LanguageCrossEntropy(), LanguagePerplexity(), MaskedAccuracy(), BitsPerByte(byte_table)]
