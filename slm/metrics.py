"""Language-model metrics (torchmetrics, summed across processes): cross-entropy, perplexity,
next-token accuracy and bits per byte.

They are computed every training batch, so none of them recomputes the cross-entropy over the
(batch x seq x vocab) logits: `CausalLM.eval_forward` hands them the mean loss over the targets
(the training forward's own loss; one cross-entropy in evaluation), and accuracy needs one argmax.

Bits per byte makes models with different tokenizers comparable: bpb = nats / (ln 2 * bytes),
where bytes = the UTF-8 length of the target tokens. In byte-level BPE every character of a
token's string stands for exactly one byte, so the byte count of a target is a table lookup;
special tokens count 0 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torchmetrics import Metric
from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label of positions without a target (the last one after shifting)


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


class _LossMetric(Metric):
    """Sums nats over targets from the mean loss in the outputs: sum = mean * number of targets."""

    full_state_update = False
    higher_is_better = False

    def __init__(self):
        super().__init__()
        self.add_state("sum_nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("targets", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs: Mapping, target: torch.Tensor) -> None:
        count = (target != IGNORE).sum()
        self.sum_nats += outputs["loss"].detach().double().to(self.sum_nats.device) * count
        self.targets += count
        self._count_bytes(target)

    def _count_bytes(self, target: torch.Tensor) -> None:
        pass

    def mean_nats(self) -> torch.Tensor:
        return self.sum_nats / self.targets.clamp(min=1)


class CrossEntropy(_LossMetric):
    def compute(self) -> torch.Tensor:
        return self.mean_nats().float()


class Perplexity(_LossMetric):
    def compute(self) -> torch.Tensor:
        return self.mean_nats().exp().float()


class BitsPerByte(_LossMetric):
    def __init__(self, byte_table: torch.Tensor):
        super().__init__()
        self.register_buffer("byte_table", byte_table, persistent=False)
        self.add_state("sum_bytes", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _count_bytes(self, target: torch.Tensor) -> None:
        self.sum_bytes += self.byte_table.to(target.device)[target[target != IGNORE]].sum().to(self.sum_bytes.device)

    def compute(self) -> torch.Tensor:
        return (self.sum_nats / (math.log(2) * self.sum_bytes.clamp(min=1))).float()


class Accuracy(Metric):
    """Share of targets whose most likely next token is the target."""

    full_state_update = False
    higher_is_better = True

    def __init__(self):
        super().__init__()
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("targets", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs: Mapping, target: torch.Tensor) -> None:
        mask = target != IGNORE
        predicted = outputs["logits"].max(dim=-1).indices.to(target.device)  # faster than argmax on CPU
        self.correct += (predicted[mask] == target[mask]).sum()
        self.targets += mask.sum()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.targets.clamp(min=1)


def build_metrics(byte_table: torch.Tensor) -> list[Metric]:
    return [CrossEntropy(), Perplexity(), Accuracy(), BitsPerByte(byte_table)]
