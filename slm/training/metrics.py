"""Language-model metrics (torchmetrics, summed across processes): cross-entropy, perplexity,
next-token accuracy and bits per byte.

In training they are updated from every batch and computed every log_interval (`TrainMetrics`),
so none of them recomputes the cross-entropy over the (batch x seq x vocab) logits:
`CausalLM.eval_forward` hands them the mean loss over the targets (the training forward's own
loss; one cross-entropy in evaluation), and accuracy needs one max over the logits.

Bits per byte makes models with different tokenizers comparable: bpb = nats / (ln 2 * bytes),
where bytes = the UTF-8 length of the target tokens. In byte-level BPE every character of a
token's string stands for exactly one byte, so the byte count of a target is a table lookup;
special tokens count 0 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.models import HuggingFaceModel
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler
from torchmetrics import Metric
from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label of positions without a target (the last one after shifting)


def byte_lengths(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Count the bytes each token id stands for (0 for special tokens), indexed by id."""
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

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("sum_nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("targets", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs: Mapping, target: torch.Tensor) -> None:
        count = (target != IGNORE).sum()
        self.sum_nats += outputs["loss"].detach().double().to(self.sum_nats.device) * count
        self.targets += count
        self._count_bytes(target)

    def _count_bytes(self, target: torch.Tensor) -> None:
        """Count the bytes the targets stand for: nothing here (BitsPerByte counts them)."""
        pass

    def mean_nats(self) -> torch.Tensor:
        """Return the mean nats per target so far (0 before any target)."""
        return self.sum_nats / self.targets.clamp(min=1)


class CrossEntropy(_LossMetric):
    """Mean next-token cross-entropy, in nats."""
    def compute(self) -> torch.Tensor:
        return self.mean_nats().float()


class Perplexity(_LossMetric):
    """exp of the mean next-token cross-entropy."""
    def compute(self) -> torch.Tensor:
        return self.mean_nats().exp().float()


class BitsPerByte(_LossMetric):
    """Next-token cross-entropy in bits per byte of the text predicted."""
    def __init__(self, byte_table: torch.Tensor, **kwargs: Any):
        super().__init__(**kwargs)
        self.register_buffer("byte_table", byte_table, persistent=False)
        self.add_state("sum_bytes", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _count_bytes(self, target: torch.Tensor) -> None:
        """Add the bytes the targets stand for (0 at ignored positions) to `sum_bytes`, with no host-device sync."""
        # A lookup of every position, the ignored ones zeroed: indexing with the mask would make the host wait for
        # the device (the mask's count decides the result's shape).
        counted = self.byte_table.to(target.device)[target.clamp(min=0)] * (target != IGNORE)
        self.sum_bytes += counted.sum().to(self.sum_bytes.device)

    def compute(self) -> torch.Tensor:
        return (self.sum_nats / (math.log(2) * self.sum_bytes.clamp(min=1))).float()


class Accuracy(Metric):
    """Share of targets that get the largest logit (a target tied for it counts as correct).

    The comparison with the row's maximum (`amax`) costs a quarter of what an argmax does on
    CPU; the two differ only on exact ties.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("targets", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs: Mapping, target: torch.Tensor) -> None:
        logits = outputs["logits"]
        target = target.to(logits.device)
        mask = target != IGNORE
        at_target = logits.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        correct = (at_target >= logits.amax(dim=-1)) & mask
        self.correct += correct.sum().to(self.correct.device)
        self.targets += mask.sum().to(self.targets.device)

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.targets.clamp(min=1)


def build_metrics(byte_table: torch.Tensor, sync: bool = True) -> list[Metric]:
    """Build the four metrics; `sync=False`: compute() uses this process's sums only (no collective)."""
    return [CrossEntropy(sync_on_compute=sync), Perplexity(sync_on_compute=sync), Accuracy(sync_on_compute=sync),
            BitsPerByte(byte_table, sync_on_compute=sync)]


class TrainMetrics(Callback):
    """The train metrics, updated from every microbatch and computed and logged every log_interval.

    Composer computes its train metrics after every batch (all-reducing them when there are several
    processes): milliseconds a batch, as much as a tiny model's whole step. So the model gives
    Composer none, and this updates the same metrics from each microbatch's outputs and logs them
    under Composer's names (`metrics/train/NAME`) every log_interval and at the end of training:
    each value covers the batches since the previous one. The partial sums ride in checkpoints
    (summed over processes, held by rank 0), so a resumed run logs what an uninterrupted one does.
    """

    def __init__(self, model: HuggingFaceModel, metrics: list[Metric], log_interval: str):
        self.model = model
        self.metrics = {type(m).__name__: m for m in metrics}
        self.due = create_interval_scheduler(log_interval, checkpoint_events=False)

    def fit_start(self, state: State, logger: Logger) -> None:
        for metric in self.metrics.values():  # on the GPU, no host sync per batch
            state.device.module_to_device(metric)

    def after_backward(self, state: State, logger: Logger) -> None:
        with torch.no_grad():
            outputs = self.model.eval_forward(state.batch, state.outputs)
            for metric in self.metrics.values():
                self.model.update_metric(state.batch, outputs, metric)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.due(state, Event.BATCH_END):
            logger.log_metrics({f"metrics/train/{name}": m.compute() for name, m in self.metrics.items()})
            for metric in self.metrics.values():
                metric.reset()

    def state_dict(self) -> dict[str, Any]:
        sums = {name: {key: getattr(m, key).detach().clone() for key in m._defaults}
                for name, m in self.metrics.items()}
        if dist.get_world_size() > 1:  # every process saves; rank 0's file is the checkpoint
            for values in sums.values():
                for value in values.values():
                    dist.all_reduce(value)
        return {"sums": sums}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, values in state.get("sums", {}).items():
            for key, value in values.items():
                setattr(self.metrics[name], key, value if dist.get_global_rank() == 0 else torch.zeros_like(value))
