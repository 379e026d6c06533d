"""The `slm` command: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from slm.errors import SlmError, run_command
from slm.paths import refuse_to_clobber


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--in-dataset", required=True,
                   help="local file or folder (txt, json/jsonl, parquet, csv, save_to_disk) or Hub dataset id")
    p.add_argument("-f", "--feature", default="text", help="column holding the text (default: %(default)s)")
    p.add_argument("-s", "--split", default="train",
                   help="split, with datasets slicing such as 'train[:95%%]' (default: %(default)s)")
    p.add_argument("--txt-per-file", action="store_true",
                   help="txt input: one document per file instead of one per line")
    p.add_argument("--batch-size", type=int, default=1000, help="documents per encode batch (default: %(default)s)")


def cmd_corpus(args: argparse.Namespace) -> None:
    from slm.corpus import write_corpus

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


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from slm.hub import Hub
    from slm.sources import iter_batches, load_documents
    from slm.tokenizer import check_vocab_size, train_tokenizer

    if not (args.out_dir or args.out_repo):
        raise SlmError("give --out-dir, --out-repo, or both")
    check_vocab_size(args.vocab_size)
    out_dir = Path(args.out_dir) if args.out_dir else None
    refuse_to_clobber(out_dir, args.overwrite)
    ds = load_documents(args.in_dataset, args.feature, args.split, args.txt_per_file)
    if len(ds) == 0:
        raise SlmError(f"split '{args.split}' of {args.in_dataset} has no documents")
    tok = train_tokenizer(iter_batches(ds, args.feature, args.batch_size), args.vocab_size, len(ds))
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
    print(f"trained a byte-level BPE tokenizer with {len(tok):,} tokens on {len(ds):,} documents; saved to "
          + " and ".join(filter(None, [str(out_dir) if out_dir else None,
                                       f"hf://{args.out_repo}" if args.out_repo else None])))


def cmd_tokenize(args: argparse.Namespace) -> None:
    from slm.hub import HF_URI, Hub, parse_hf_uri
    from slm.shards import write_shards
    from slm.sources import iter_batches, load_documents
    from slm.tokenizer import load_tokenizer, tokenizer_identity

    if args.seq_len < 2:
        raise SlmError(f"--seq-len must be at least 2 (one <bos> plus one token), got {args.seq_len}")
    if not (args.out_dir or args.out_remote):
        raise SlmError("give --out-dir, --out-remote, or both")
    # hf:// goes through slm's own Hub code (one commit, retries); other remotes through Streaming's uploaders.
    to_hub = parse_hf_uri(args.out_remote) if (args.out_remote or "").startswith(HF_URI) else None
    out_dir = Path(args.out_dir) if args.out_dir else None
    refuse_to_clobber(out_dir, args.overwrite)
    tok = load_tokenizer(args.tokenizer, args.bos_token, args.eos_token)
    ds = load_documents(args.in_dataset, args.feature, args.split, args.txt_per_file)
    source = {"dataset": args.in_dataset, "feature": args.feature, "split": args.split}
    with tempfile.TemporaryDirectory() as tmp:
        local = out_dir or (Path(tmp) / "shards" if to_hub else None)
        stats = write_shards(iter_batches(ds, args.feature, args.batch_size), tok,
                             tokenizer_identity(tok, args.tokenizer), args.seq_len, out_dir=local,
                             out_remote=None if to_hub else args.out_remote, compression=args.compression,
                             overwrite=args.overwrite, total_docs=len(ds), source=source)
        if to_hub:
            repo_type, repo_id, path = to_hub
            Hub().push_folder(local, repo_id, f"MDS shards of {args.in_dataset} [{args.split}] by slm",
                              repo_type=repo_type, path_in_repo=path)
    where = " and ".join(filter(None, [str(out_dir) if out_dir else None, args.out_remote]))
    print(f"wrote {stats.samples:,} samples of {args.seq_len} tokens to {where}: {stats.documents:,} documents, "
          f"{stats.tokens:,} tokens ({stats.dropped_tail_tokens} dropped at the tail), "
          f"{stats.tokens / stats.seconds:,.0f} tokens/s")


def cmd_export(args: argparse.Namespace) -> None:
    from slm.export import export_checkpoint
    from slm.hub import Hub

    if not (args.out_dir or args.out_repo):
        raise SlmError("give --out-dir, --out-repo, or both")
    with tempfile.TemporaryDirectory() as tmp:
        out = export_checkpoint(Path(args.checkpoint), Path(args.out_dir or Path(tmp) / "export"), args.overwrite)
        if args.out_repo:
            Hub().push_folder(out, args.out_repo, f"HF export of {Path(args.checkpoint).name} by slm")
    where = " and ".join(filter(None, [args.out_dir, f"hf://{args.out_repo}" if args.out_repo else None]))
    print(f"exported {args.checkpoint} to {where}; load it with "
          f"AutoModelForCausalLM.from_pretrained('{args.out_dir or args.out_repo}')")


def cmd_generate(args: argparse.Namespace) -> None:
    from slm.generate import generate

    if args.max_new_tokens < 1:
        raise SlmError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    for i, text in enumerate(generate(args.model, args.prompt, args.max_new_tokens, args.temperature,
                                      args.top_k or None, args.seed, args.num_samples)):
        print(("\n" if i else "") + text)


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from slm.evaluate import evaluate

    if args.batch_size < 1:
        raise SlmError(f"--batch-size must be at least 1, got {args.batch_size}")
    print(json.dumps(evaluate(Path(args.model), Path(args.data), args.batch_size, args.max_batches), indent=2))


def cmd_logprobs(args: argparse.Namespace) -> None:
    from slm.logprobs import write_logprobs

    write_logprobs(args.model, Path(args.data), Path(args.out_dir) if args.out_dir else None, args.out_repo,
                   args.checkpoints, args.batch_size, args.max_samples)


def cmd_plot(args: argparse.Namespace) -> None:
    from slm.plot import plot_runs

    out = plot_runs([Path(f) for f in args.run_dirs], Path(args.out))
    print(f"plotted {len(args.run_dirs)} run(s) to {out}")


def cmd_verify(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from slm.verify import verify

    target, run = args.target, Path(args.run_folder) if args.run_folder else None
    if Path(target).is_dir():  # a run folder: its repo, and its checkpoints
        config = Path(target) / "config.yaml"
        if not config.is_file():
            raise SlmError(f"{target} is no run folder (no config.yaml): give a Hub repo ORG/NAME or a run folder")
        run = run or Path(target)
        target = OmegaConf.load(config).get("hub", {}).get("repo")
        if not target:
            raise SlmError(f"{config} has no hub.repo: give the Hub repo, e.g. slm verify ORG/NAME --run {args.target}")
    elif target.count("/") != 1:
        raise SlmError(f"{target} is neither a run folder nor a Hub model repo ORG/NAME")
    if run is not None and not run.is_dir():
        raise SlmError(f"--run {run}: no such run folder")
    report = verify(target, args.revision, run, args.deep)
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.ok else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    from slm.sweep import main

    return main(args.argv, prog="slm sweep", debug=args.debug)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser = argparse.ArgumentParser(prog="slm", parents=[common],
                                     description="Train suites of small language models (llama, mamba, any causal LM).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("corpus", parents=[common], help="write the embedded default corpus (children's stories)",
                       description="Write procedurally generated children's stories as JSON lines "
                                   "(text in the field 'story'). Same seed, same file, byte for byte.")
    p.add_argument("-o", "--out", required=True, help="output .jsonl file")
    p.add_argument("-n", "--num-docs", type=int, default=20_000, help="number of stories (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(run=cmd_corpus)

    p = sub.add_parser("tokenizer", parents=[common], help="train a byte-level BPE tokenizer",
                       description="Train a reversible byte-level BPE tokenizer with <bos> <eos> <pad> at ids "
                                   "0 1 2, saved as a folder that AutoTokenizer.from_pretrained loads.")
    _add_input_args(p)
    p.add_argument("-v", "--vocab-size", type=int, default=4096, help="vocabulary size (default: %(default)s)")
    p.add_argument("--out-dir", help="folder to save the tokenizer to")
    p.add_argument("--out-repo", help="Hub model repo to push the tokenizer to (created private if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    p.set_defaults(run=cmd_tokenizer)

    p = sub.add_parser("tokenize", parents=[common], help="tokenize text into MDS shards for training",
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
    p.set_defaults(run=cmd_tokenize)

    p = sub.add_parser("export", parents=[common], help="export a checkpoint as a HuggingFace model folder",
                       description="Write a save_pretrained folder (model, tokenizer, model card, slm-run.json) "
                                   "from a checkpoint of slm/train.py, e.g. checkpoints/RUN/latest-rank0.pt.")
    p.add_argument("checkpoint", help="checkpoint file (.pt) written by slm/train.py")
    p.add_argument("-o", "--out-dir", help="folder to write")
    p.add_argument("--out-repo", help="Hub model repo to push the export to (created private if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("generate", parents=[common], help="sample text from an exported model",
                       description="Continue a prompt as the start of a new document, until <eos> or "
                                   "--max-new-tokens.")
    p.add_argument("model", help="folder written by `slm export` (or a Hub model id)")
    p.add_argument("-p", "--prompt", default="Once upon a time", help="text to continue (default: %(default)s)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=200, help="(default: %(default)s)")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="0 = no top-k cut (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=1, help="(default: %(default)s)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("eval", parents=[common], help="evaluate a model on MDS shards (metrics as JSON)",
                       description="Cross-entropy (nats), perplexity, next-token accuracy and bits per byte of a "
                                   "checkpoint or exported model on an MDS folder, printed as JSON.")
    p.add_argument("model", help="checkpoint file of slm/train.py, or a folder written by `slm export`")
    p.add_argument("-d", "--data", required=True, help="MDS folder written by `slm tokenize`")
    p.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--max-batches", type=int, help="stop after this many batches (default: the whole folder)")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("logprobs", parents=[common], help="per-token log-probs of a split under every checkpoint",
                       description="For each checkpoint of MODEL, the next-token log-probability of every token of "
                                   "an MDS split, in the split's order: one Parquet table per checkpoint with the "
                                   "columns sample (index in the split), token_ids and logprobs (log p(token i | "
                                   "tokens < i) from float32 log-softmax; NaN at position 0). A checkpoint whose "
                                   "table is already in every output is skipped. Runs on the GPU if there is one.")
    p.add_argument("model", help="run folder (its complete ep*-ba*-rank0.pt), checkpoint file (.pt), folder "
                                 "written by `slm export`, or Hub model repo ORG/NAME (its ba{B} branches)")
    p.add_argument("-d", "--data", required=True, help="MDS folder written by `slm tokenize`")
    p.add_argument("--checkpoints", default="all", help="'all' or labels such as ba400,ba800 (default: all)")
    p.add_argument("--out-dir", help="folder for LABEL.parquet, one per checkpoint")
    p.add_argument("--out-repo", help="Hub dataset repo to push to: branch LABEL holds logprobs.parquet "
                                      "(created private if missing)")
    p.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--max-samples", type=int, help="only the first this many samples (default: the whole split)")
    p.set_defaults(run=cmd_logprobs)

    p = sub.add_parser("plot", parents=[common], help="draw loss, eval loss and lr curves of runs to a PNG",
                       description="Overlay the curves of one or more runs (their save_folder, e.g. "
                                   "checkpoints/llama-1m) and, for a suite, last eval loss against parameters.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder holding metrics.jsonl and run.json")
    p.add_argument("-o", "--out", default="curves.png", help="PNG file to write (default: curves.png)")
    p.set_defaults(run=cmd_plot)

    p = sub.add_parser("verify", parents=[common], help="check that a run's Hub repo serves what was trained",
                       description="Compare what a run's Hub model repo serves (file sizes and hashes, as the Hub "
                                   "lists them) with its manifest (slm-manifest.json on main) and, with --run, with "
                                   "the run folder's checkpoints. Faults: branches serving another batch's weights "
                                   "or identical weights, a file whose hash or size differs, a checkpoint without "
                                   "its branch or a branch without its entry, a stale latest pointer, a local "
                                   "checkpoint missing on the Hub, and with --deep an export whose weights differ "
                                   "from its checkpoint. Exit status 1 if any is found.")
    p.add_argument("target", metavar="REPO_OR_RUN_FOLDER",
                   help="Hub model repo ORG/NAME, or a run folder (the hub.repo of its config.yaml, checked against "
                        "its checkpoints)")
    p.add_argument("--revision", help="commit (or branch) of main to check (default: main)")
    p.add_argument("--run", dest="run_folder", metavar="RUN_FOLDER",
                   help="run folder whose complete checkpoints the repo must hold, byte for byte")
    p.add_argument("--deep", action="store_true", help="download every checkpoint and export and recompute their "
                                                       "weights digests")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=cmd_verify)

    # slm.sweep parses its own arguments (options and configs in any order, which a subparser cannot): this one
    # takes everything after `sweep` as it is (no prefix character anyone types, so no option of its own).
    p = sub.add_parser("sweep", prefix_chars="\0", add_help=False, help="list the tasks of a grid sweep, "
                       "as jobs/suite.sbatch and jobs/suite.sh run them (slm sweep --help)")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(run=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"slm {args.command}", lambda: args.run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
