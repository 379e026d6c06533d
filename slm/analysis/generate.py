"""Sampling text from an exported model (`slm generate`)."""

from __future__ import annotations

from pathlib import Path

import torch

from slm.core.errors import SlmError
from slm.core.paths import is_local_path
from slm.data.tokenizer import load_tokenizer
from slm.training.model import load_pretrained


def generate(model_dir: str, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
             top_k: int | None = 50, seed: int = 0, num_samples: int = 1) -> list[str]:
    """Continue `prompt` as the start of a new document: `<bos> <eos> prompt`, stopping at `<eos>`.

    Training samples start with `<bos>` anywhere in the token stream, and documents begin after
    an `<eos>`, so this is the context the model saw before every story's first token.
    """
    if not Path(model_dir).exists() and is_local_path(model_dir):
        raise SlmError(f"model folder not found: {model_dir} (make one with `slm export`)")
    tokenizer = load_tokenizer(model_dir)
    model = load_pretrained(model_dir, "a model from").eval()
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    limit = getattr(model.config, "max_position_embeddings", None)  # llama has one; mamba has none
    if limit is not None:
        if len(ids) >= limit:
            raise SlmError(f"the prompt is {len(ids)} tokens; the model reads at most {limit}")
        max_new_tokens = min(max_new_tokens, limit - len(ids))
    torch.manual_seed(seed)
    with torch.no_grad():
        inputs = torch.tensor([ids])
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                             do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None, top_k=top_k,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                             num_return_sequences=num_samples)
    return [prompt + tokenizer.decode(row[len(ids):], skip_special_tokens=True) for row in out]
