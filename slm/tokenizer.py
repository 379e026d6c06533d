"""Training and loading tokenizers.

Ours is a reversible byte-level BPE (GPT-2 style) with `<bos>` `<eos>` `<pad>` at ids
0 1 2, saved as a `PreTrainedTokenizerFast` folder. Any other fast HF tokenizer works
too, as long as it has bos/eos ids (or the user names the tokens).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from slm.errors import SlmError
from slm.paths import is_local_path

SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the specials


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise SlmError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least "
                       f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")


def train_tokenizer(batches: Iterable[list[str]], vocab_size: int, num_docs: int | None = None
                    ) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on batches of documents; specials get ids 0, 1, 2."""
    check_vocab_size(vocab_size)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    bpe.train_from_iterator(batches, trainer=trainer, length=num_docs)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)


def load_tokenizer(name: str, bos_token: str | None = None, eos_token: str | None = None
                   ) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a folder or Hub id, with bos/eos ids guaranteed."""
    local = Path(name).expanduser()
    if not local.exists() and is_local_path(name):
        raise SlmError(f"tokenizer not found: {name}")
    try:
        tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else name,
                                            clean_up_tokenization_spaces=False)
    except (OSError, ValueError) as e:
        raise SlmError(f"cannot load tokenizer '{name}': {str(e).splitlines()[0]}") from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise SlmError(f"tokenizer '{name}' has no fast (Rust) version; slm needs a fast tokenizer")
    for role, token in (("bos_token", bos_token), ("eos_token", eos_token)):
        if token is not None:
            if tok.convert_tokens_to_ids(token) in (None, tok.unk_token_id):
                raise SlmError(f"--{role.replace('_', '-')} {token!r} is not in the vocabulary of '{name}'")
            setattr(tok, role, token)
        if getattr(tok, f"{role}_id") is None:
            flag = f"--{role.replace('_', '-')}"
            raise SlmError(f"tokenizer '{name}' has no {role.split('_')[0]} token; name one with {flag} TOKEN")
    return tok


def tokenizer_identity(tok: PreTrainedTokenizerFast, name: str) -> dict:
    """What shards and checkpoints record so a mismatched tokenizer is caught later."""
    content = tok.backend_tokenizer.to_str().encode()
    return {"name": name, "vocab_size": len(tok), "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id,
            "pad_id": tok.pad_token_id, "content_hash": "sha256:" + hashlib.sha256(content).hexdigest()}
