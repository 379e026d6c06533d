"""The `slm` commands that make data: corpus, tokenizer, tokenize (each one's arguments, then its handler)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from slm.core.errors import SlmError, say
from slm.core.paths import places, refuse_to_clobber, require_output

if TYPE_CHECKING:  # each command imports what it needs when it runs: `slm --help` starts at once
    from collections.abc import Callable, Iterator


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """Add the arguments naming the input documents to `p` (shared by `slm tokenizer` and `slm tokenize`)."""
    p.add_argument("-i", "--in-dataset", required=True,
                   help="local file, glob ('data/*.jsonl.gz', read in sorted order) or folder (txt, BabyLM's "
                        ".train/.dev/.test, json/jsonl, parquet, csv, save_to_disk), Hub dataset id, or URL "
                        "(hf://, s3://, https://...; always streamed)")
    p.add_argument("-f", "--feature", default="text", help="column holding the text (default: %(default)s)")
    p.add_argument("-s", "--split", default="train",
                   help="split, with datasets slicing such as 'train[:95%%]' when not streamed (default: "
                        "%(default)s)")
    p.add_argument("--stream", action="store_true",
                   help="read the input as it goes, in order, without downloading or preparing it whole first")
    p.add_argument("--max-docs", type=int, metavar="N", help="only the first N documents (e.g. a fixed-size sample "
                   "of a streamed corpus to train the tokenizer on)")
    p.add_argument("--txt-by", metavar="{line,paragraph,file}",
                   help="text input: what a document is: a line, a blank-line block or a file (default: a line; "
                        "a blank-line block in BabyLM's .train/.dev/.test files)")
    p.add_argument("--txt-per-file", dest="txt_by", action="store_const", const="file", help="the same as "
                   "--txt-by file")
    p.add_argument("--batch-size", type=int, default=1000, help="documents per encode batch (default: %(default)s)")


def _input_args(args: argparse.Namespace) -> tuple:
    """Return `open_input`'s arguments from the command line's."""
    return args.in_dataset, args.feature, args.split, args.txt_by, args.stream, args.max_docs


def add_corpus(new_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `slm corpus` and its arguments."""
    p = new_command("corpus", help="write the embedded default corpus (children's stories)",
                    description="Write procedurally generated children's stories as JSON lines "
                                "(text in the field 'story'). Same seed, same file, byte for byte.")
    p.add_argument("-o", "--out", required=True, help="output .jsonl file")
    p.add_argument("-n", "--num-docs", type=int, default=20_000, help="number of stories (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(run=cmd_corpus)


def cmd_corpus(args: argparse.Namespace) -> None:
    """Write the embedded story corpus to --out."""
    from slm.data.corpus import write_corpus

    out = Path(args.out)
    refuse_to_clobber(out, args.overwrite)
    if args.num_docs < 1:
        raise SlmError(f"--num-docs must be at least 1, got {args.num_docs}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        size = write_corpus(out, args.num_docs, args.seed)
    except OSError as e:
        raise SlmError(f"cannot write {out}: {e.strerror or e}") from e
    print(f"wrote {args.num_docs:,} stories ({size / 1e6:.1f} MB, seed {args.seed}) to {out} "
          f"in {time.perf_counter() - start:.1f} s; the text is in the field 'story'")


def add_tokenizer(new_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `slm tokenizer` and its arguments."""
    p = new_command("tokenizer", help="train a byte-level BPE tokenizer",
                    description="Train a reversible byte-level BPE tokenizer with <bos> <eos> <pad> at ids "
                                "0 1 2, saved as a folder that AutoTokenizer.from_pretrained loads.")
    _add_input_args(p)
    p.add_argument("-v", "--vocab-size", type=int, default=4096, help="vocabulary size (default: %(default)s)")
    p.add_argument("--out-dir", help="folder to save the tokenizer to")
    p.add_argument("--out-repo", help="Hub model repo to push the tokenizer to (created private if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    p.set_defaults(run=cmd_tokenizer)


def cmd_tokenizer(args: argparse.Namespace) -> None:
    """Train a byte-level BPE tokenizer on the input and save it to --out-dir and/or --out-repo."""
    from slm.data.documents import open_input
    from slm.data.tokenizer import check_vocab_size, train_tokenizer
    from slm.hub.client import Hub

    require_output(args.out_dir, args.out_repo)
    check_vocab_size(args.vocab_size)
    out_dir = Path(args.out_dir) if args.out_dir else None
    refuse_to_clobber(out_dir, args.overwrite)
    documents = open_input(*_input_args(args))
    if documents.documents == 0:
        raise SlmError(f"split '{args.split}' of {args.in_dataset} has no documents")
    read = 0

    def batches() -> Iterator[list[str]]:
        nonlocal read
        for batch in documents.batches(args.batch_size):
            read += len(batch)
            yield batch

    tok = train_tokenizer(batches(), args.vocab_size, documents.documents)
    if read == 0:
        raise SlmError(f"split '{args.split}' of {args.in_dataset} has no documents")
    with tempfile.TemporaryDirectory() as tmp:
        folder = out_dir or Path(tmp)
        try:
            tok.save_pretrained(str(folder))
        except OSError as e:
            raise SlmError(f"cannot write to {folder}: {e.strerror or e}") from e
        if args.out_repo:
            Hub().push_folder(folder, args.out_repo, f"Tokenizer trained by slm on {args.in_dataset}")
    if len(tok) < args.vocab_size:
        print(f"note: the corpus has too few distinct words for more merges: {len(tok):,} tokens, not "
              f"{args.vocab_size:,}; model vocab sizes >= {len(tok):,} work with it", file=sys.stderr)
    print(f"trained a byte-level BPE tokenizer with {len(tok):,} tokens on {read:,} documents; saved to "
          + places(out_dir, args.out_repo and f"hf://{args.out_repo}"))


def add_tokenize(new_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `slm tokenize` and its arguments."""
    p = new_command("tokenize", help="tokenize text into MDS shards for training",
                    description="Tokenize documents, append <eos> to each, concatenate, cut into pieces of "
                                "seq_len-1 tokens, prefix each with <bos>, and write MDS shards (column "
                                "'tokens') plus slm-dataset.json. The short tail is dropped; no padding.")
    _add_input_args(p)
    p.add_argument("-t", "--tokenizer", required=True, help="tokenizer folder or Hub id")
    p.add_argument("-l", "--seq-len", type=int, default=512, help="tokens per sample (default: %(default)s)")
    p.add_argument("--out-dir", help="local folder for the shards")
    p.add_argument("--out-remote", help="remote for the shards: hf://datasets/ORG/REPO/PATH, s3://, gs://, ...")
    p.add_argument("--compression", default="zstd", help="shard compression, or 'none' (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    p.add_argument("--bos-token", help="the tokenizer's beginning-of-sequence token, if it does not declare one")
    p.add_argument("--eos-token", help="the tokenizer's end-of-sequence token, if it does not declare one")
    p.add_argument("--parts", type=int, help="tokenize in N parts (contiguous ranges of documents; of a streamed "
                                             "input, runs of its files) side by side, "
                                             "then merge them: the same shards as one process; finished parts "
                                             "(in OUT.parts/ beside --out-dir) are kept and a killed one is redone")
    p.add_argument("--part", type=int, help="with --parts N: tokenize only part P (1..N), e.g. a scheduler array "
                                            "task's id (jobs/tokenize.sbatch, jobs/tokenize.sh)")
    p.add_argument("--check", action="store_true", help="only check the arguments, the tokenizer and the input's "
                   "first document, and write nothing (the job scripts run this before they submit)")
    p.add_argument("--merge", action="store_true", help="with --parts N: only merge the N parts (refusing a "
                                                        "missing one), once every --part is done")
    p.set_defaults(run=cmd_tokenize)


def cmd_tokenize(args: argparse.Namespace) -> None:
    """Tokenize the input into MDS shards (in one process, or in --parts), locally and/or to a remote."""
    from slm.data.documents import open_input, reads_streamed
    from slm.data.shards import write_shards
    from slm.data.tokenizer import load_tokenizer, tokenizer_identity
    from slm.hub.client import HF_URI, Hub, parse_hf_uri

    if args.seq_len < 2:
        raise SlmError(f"--seq-len must be at least 2 (one <bos> plus one token), got {args.seq_len}")
    require_output(args.out_dir, args.out_remote, "--out-remote")
    in_parts = args.parts is not None
    if (args.part is not None or args.merge) and not in_parts:
        raise SlmError("--part and --merge are steps of --parts N: give --parts too")
    if args.part is not None and args.merge:
        raise SlmError("give --part P (tokenize one part) or --merge (merge them all), not both")
    if in_parts:
        from slm.data import parts

        parts.check_parts(args.parts, args.part)
        if not args.out_dir:
            raise SlmError("--parts needs --out-dir: the parts are written beside it (OUT.parts/), on a filesystem "
                           "every host sees")
    # hf:// goes through slm's own Hub code (one commit, retries); other remotes through Streaming's uploaders.
    to_hub = parse_hf_uri(args.out_remote) if (args.out_remote or "").startswith(HF_URI) else None
    out_dir = Path(args.out_dir) if args.out_dir else None
    refuse_to_clobber(out_dir, args.overwrite)
    tok = load_tokenizer(args.tokenizer, args.bos_token, args.eos_token)
    identity = tokenizer_identity(tok, args.tokenizer)
    if in_parts and args.max_docs is not None and reads_streamed(args.in_dataset, args.stream):
        raise SlmError("--max-docs and --parts do not go together on a streamed input (its parts are runs of its "
                       "files): tokenize the sample in one part")
    if args.check:
        from slm.data.documents import check_input

        checked = check_input(args.in_dataset, args.feature, args.split, args.txt_by, args.stream)
        if in_parts and reads_streamed(args.in_dataset, args.stream):
            parts.new_job({}, checked, identity, args.seq_len, args.parts, out_dir)  # at most a part a file
        print(f"slm tokenize: checked: the tokenizer ({identity['vocab_size']:,} tokens), the input's first "
              f"document and where the output goes")
        return
    documents = open_input(*_input_args(args))
    source = {"dataset": args.in_dataset, "feature": args.feature, "split": args.split,
              **({"txt_by": args.txt_by} if args.txt_by else {})}
    with tempfile.TemporaryDirectory() as tmp:
        local = out_dir or (Path(tmp) / "shards" if to_hub else None)
        remote = None if to_hub else args.out_remote
        if in_parts:
            job = parts.new_job(source, documents, identity, args.seq_len, args.parts, out_dir)
            if args.part is not None:
                done = job.done(args.part)
                if not done:
                    parts.tokenize_part(job, args.part, documents, tok, identity, args.batch_size)
                print(f"part {args.part} of {args.parts} {'was done already' if done else 'done'}: "
                      f"{job.part_folder(args.part)}; merge the parts with --merge once all are done")
                return
            missing = [] if args.merge else job.missing()
            if missing:
                count = f"{documents.documents:,} documents" if documents.documents is not None else \
                    f"{documents.files:,} files"
                say(f"tokenizing {len(missing)} of {args.parts} parts ({count} in all) side by side", "slm tokenize")
            with parts.parts_running(job, missing, _input_args(args), (args.tokenizer, args.bos_token, args.eos_token),
                                     identity, args.batch_size) as running:
                stats = parts.merge_parts(job, identity, out_remote=remote, compression=args.compression,
                                          overwrite=args.overwrite, running=running)
        else:
            stats = write_shards(documents.batches(args.batch_size), tok, identity, args.seq_len, out_dir=local,
                                 out_remote=remote, compression=args.compression, overwrite=args.overwrite,
                                 total_docs=documents.documents, source=source)
        if to_hub:
            repo_type, repo_id, path = to_hub
            Hub().push_folder(local, repo_id, f"MDS shards of {args.in_dataset} [{args.split}] by slm",
                              repo_type=repo_type, path_in_repo=path)
    where = places(out_dir, args.out_remote)
    print(f"wrote {stats.samples:,} samples of {args.seq_len} tokens to {where}: {stats.documents:,} documents, "
          f"{stats.tokens:,} tokens ({stats.dropped_tail_tokens} dropped at the tail), "
          f"{stats.tokens / stats.seconds:,.0f} tokens/s{' merged' if args.merge else ''}")
