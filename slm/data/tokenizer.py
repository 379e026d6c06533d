"""Training and loading tokenizers.

Ours is a reversible byte-level BPE (GPT-2 style) with `<bos>` `<eos>` `<pad>` at ids
0 1 2, saved as a `PreTrainedTokenizerFast` folder. Any other fast HF tokenizer works
too, as long as it has bos/eos ids (or the user names the tokens).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from slm.core.errors import Refused, SlmError
from slm.core.foreign import checked_folder, mapping, read_json, shown
from slm.core.paths import is_local_path

SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the specials


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a vocabulary too small for byte-level BPE's bytes and slm's special tokens."""
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


def check_tokenizer_folder(folder: Path) -> None:
    """Check a tokenizer folder (maybe from elsewhere, or named by a record from elsewhere) before transformers reads
    it: nothing in it leads outside it (slm/core/foreign.py), and its tokenizer_config.json names no file of its own
    (`tokenizer_file`, `vocab_file`, ...: transformers would read one from wherever it points, when the folder lacks
    it). Its `auto_map` code never runs: slm loads with trust_remote_code=False."""
    checked_folder(folder, "tokenizer folder")
    config = folder / "tokenizer_config.json"
    if not config.exists():
        return
    for key, value in mapping(read_json(config, "tokenizer config"), str(config)).items():
        if key.endswith("_file") and value is not None:
            raise Refused(f"{config} names a file of its own ({key}: {shown(value)}), which transformers would read "
                          "from wherever it points and slm never writes: refused (docs/security.md)")


def load_tokenizer(name: str, bos_token: str | None = None, eos_token: str | None = None,
                   content_hash: str | None = None) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a folder or Hub id, with bos/eos ids guaranteed; with `content_hash` (a record's),
    only if it is the tokenizer that hash names (a location read from elsewhere opens nothing but that tokenizer)."""
    local = Path(name).expanduser()
    if not local.exists() and is_local_path(name):
        raise SlmError(f"tokenizer not found: {name}")
    if local.exists():
        if not local.is_dir():
            raise SlmError(f"tokenizer {name} is a file, not a tokenizer folder")
        check_tokenizer_folder(local)
    source = str(local) if local.exists() else name
    options = {"clean_up_tokenization_spaces": False, "trust_remote_code": False}
    try:
        try:
            tok = AutoTokenizer.from_pretrained(source, **options)
        except ValueError as e:
            # A folder saved by transformers >= 5 names the class `TokenizersBackend`, unknown to the pinned
            # transformers; its tokenizer.json and special tokens are all a fast tokenizer needs.
            if "does not exist or is not currently imported" not in str(e):
                raise
            tok = PreTrainedTokenizerFast.from_pretrained(source, **options)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, and the tokenizers library's bare Exception
        raise SlmError(f"cannot load tokenizer '{name}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from e
    if content_hash is not None and not tokenizer_matches(tok, {"content_hash": content_hash}):
        raise SlmError(f"tokenizer {name} is not the one recorded with it (content hashes differ): put that "
                       "tokenizer there")
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


# Text whose normalization, pre-tokenization and ids stand for the tokenizer's behaviour in the content hash:
# ASCII, digits, punctuation, runs of spaces, tabs and newlines, composed and decomposed accents, Greek,
# Cyrillic, CJK, Hangul, emoji (with a skin tone and a joiner), zero-width characters and special tokens' text.
PROBE = ("Hello, World! It's 2024: 3.14 + 1,000,000 = x_y-z (a) [b] {c} #@$%^&*~`|\\/<>?;\"'\n"
         "a  b   c    d\t\te \r\n\n  \n Café cafe\u0301 naïve nai\u0308ve Ωμέγα Привет 日本語のテキスト 中文 한국어 "
         "😀👍🏽👨\u200d👩\u200d👧 \u200b\ufeff <bos>x<eos> <pad>  ")


def _content_hash(tok: PreTrainedTokenizerFast) -> str:
    """Return the sha256 of what decides the ids (vocabulary, merges or scores, added tokens, normalizer and
    pre-tokenizer behaviour, the ids of PROBE), not of the JSON text, which changes with library versions for one
    tokenizer."""
    backend = tok.backend_tokenizer
    if backend.truncation or backend.padding:  # they change what encode() returns, not the tokenizer
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    model = json.loads(backend.to_str())["model"]
    pieces = None
    if model["type"] == "BPE":  # merges are "a b" strings before tokenizers 0.20, ["a", "b"] pairs since
        pieces = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
    elif model["type"] == "Unigram":
        pieces = [[piece, score] for piece, score in model["vocab"]]
    normalizer, pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    normalized = normalizer.normalize_str(PROBE) if normalizer else PROBE
    content = {
        "vocab": sorted((i, t) for t, i in backend.get_vocab(with_added_tokens=True).items()),
        "model": model["type"], "pieces": pieces,
        "added": [[i, t.content, t.special] for i, t in sorted(backend.get_added_tokens_decoder().items())],
        "normalized": normalized,
        "pre_tokenized": [piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalized)] if pre_tokenizer else None,
        "ids": backend.encode(PROBE, add_special_tokens=False).ids,
    }
    return "sha256:" + hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()


def _legacy_content_hash(tok: PreTrainedTokenizerFast) -> str:
    """Return the hash slm recorded before the content hash: of the serialized tokenizer, library versions included."""
    return "sha256:" + hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()


def tokenizer_location(name: str) -> str:
    """Return a tokenizer's name as files record it: a folder's absolute path (a relative one, read from another folder,
    would pass for a Hub id), else the Hub id as given."""
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def tokenizer_identity(tok: PreTrainedTokenizerFast, name: str) -> dict:
    """Return what shards and checkpoints record so a mismatched tokenizer is caught later (`name` as
    `tokenizer_location` gives it)."""
    return {"name": tokenizer_location(name), "vocab_size": len(tok), "bos_id": tok.bos_token_id,
            "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id, "content_hash": _content_hash(tok)}


def tokenizer_matches(tok: PreTrainedTokenizerFast, recorded: dict) -> bool:
    """Return whether `tok` is the tokenizer `recorded` (a tokenizer_identity) names; shards of an older slm recorded
    the legacy hash, which still matches under the library versions that wrote them."""
    return recorded["content_hash"] in (_content_hash(tok), _legacy_content_hash(tok))


def mismatch_hint(tok: PreTrainedTokenizerFast, recorded: dict) -> str:
    """Return what to do about a tokenizer that does not match `recorded`: nothing to add when the sizes already
    differ."""
    if recorded["vocab_size"] != len(tok):
        return ""
    return ("; if these shards were made with this tokenizer by an older slm under other library versions, "
            "tokenize them again")
