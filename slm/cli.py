"""The `slm` command: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from slm.core.errors import SlmError, run_command, say
from slm.core.paths import places, refuse_to_clobber, require_output

if TYPE_CHECKING:  # the commands import what they need when they run: `slm --help` starts at once
    from collections.abc import Iterator

    from slm.analysis.batches import Batches


def _add_input_args(p: argparse.ArgumentParser) -> None:
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


def cmd_corpus(args: argparse.Namespace) -> None:
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


def cmd_tokenizer(args: argparse.Namespace) -> None:
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


def cmd_tokenize(args: argparse.Namespace) -> None:
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


def cmd_export(args: argparse.Namespace) -> None:
    from slm.hub.client import Hub
    from slm.training.export import export_checkpoint

    require_output(args.out_dir, args.out_repo)
    with tempfile.TemporaryDirectory() as tmp:
        out = export_checkpoint(Path(args.checkpoint), Path(args.out_dir or Path(tmp) / "export"), args.overwrite)
        if args.out_repo:
            Hub().push_folder(out, args.out_repo, f"HF export of {Path(args.checkpoint).name} by slm")
    where = places(args.out_dir, args.out_repo and f"hf://{args.out_repo}")
    print(f"exported {args.checkpoint} to {where}; load it with "
          f"AutoModelForCausalLM.from_pretrained('{args.out_dir or args.out_repo}')")


def cmd_generate(args: argparse.Namespace) -> None:
    from slm.analysis.generate import generate

    if args.max_new_tokens < 1:
        raise SlmError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    for i, text in enumerate(generate(args.model, args.prompt, args.max_new_tokens, args.temperature,
                                      args.top_k or None, args.seed, args.num_samples)):
        print(("\n" if i else "") + text)


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from slm.analysis.evaluate import evaluate, evaluate_runs
    from slm.analysis.harness import Harness

    if args.batch_size < 1:
        raise SlmError(f"--batch-size must be at least 1, got {args.batch_size}")
    data = Path(args.data) if args.data else None
    harness = Harness(args.tasks, Path(args.include_path) if args.include_path else None, args.limit,
                      args.batch_size) if args.tasks else None
    if args.out:
        done, skipped = evaluate_runs(args.models, data, Path(args.out), args.checkpoints, args.batch_size,
                                      args.max_batches, harness)
        print(f"evaluated {done} checkpoint(s) into {args.out}" + (f" ({skipped} already there)" if skipped else ""))
        return
    from slm.core.paths import is_local_path

    single = Path(args.models[0])
    a_run = single.is_dir() and not (single / "config.json").exists()
    if len(args.models) > 1 or a_run or not (single.exists() or is_local_path(args.models[0])):
        raise SlmError("several checkpoints (a run folder, a Hub repo, several models) go into a table: give "
                       "--out FILE.parquet or FILE.csv")
    print(json.dumps(evaluate(single, data, args.batch_size, args.max_batches, harness), indent=2))


def cmd_logprobs(args: argparse.Namespace) -> None:
    from slm.analysis.logprobs import Reading, write_logprobs

    write_logprobs(args.models, Path(args.data), Path(args.out_dir) if args.out_dir else None, args.out_repo,
                   args.checkpoints, Reading(args.batch_size, args.precision), args.max_samples)


def cmd_dynamics(args: argparse.Namespace) -> None:
    import numpy as np

    from slm.analysis.dynamics import plot_dynamics
    from slm.analysis.suite import open_suite

    out, data = Path(args.out), Path(args.data)
    for path in (out, out.with_name(f"{out.stem}-tokens.parquet"), Path(args.plot) if args.plot else None):
        refuse_to_clobber(path, args.overwrite)
    runs = open_suite(args.model).runs
    if len(runs) != 1:
        raise SlmError(f"{args.model} names {len(runs)} runs: give one run folder or Hub repo")
    run = runs[0]
    totals = run.write_dynamics(data, out, args.margin, args.max_samples, args.logprobs, args.batch_size,
                                args.chunk_samples)
    unit = "tokens seen" if totals.checkpoints[0]["tokens"] else "batches"
    print(f"{run.name}: {totals.positions:,} tokens of {data} over {len(totals.checkpoints)} checkpoints: median age "
          f"of acquisition {totals.middle_age():,} {unit}, {totals.forgotten / totals.positions:.1%} of the tokens "
          f"forgotten at least once (margin {totals.margin} nats); wrote {out} and "
          f"{out.with_name(f'{out.stem}-tokens.parquet')}")
    if args.plot:
        tokenizer = run.checkpoints[-1].tokenizer()
        token_ids = [int(t) for t in args.plot_tokens.split(",")] if args.plot_tokens else None
        chosen = token_ids or np.flatnonzero(totals.counts).tolist()
        labels = {t: repr(tokenizer.decode([t])) for t in set(chosen)}
        print(f"plotted {plot_dynamics(totals, Path(args.plot), token_ids, labels)}")


def cmd_plot(args: argparse.Namespace) -> None:
    from slm.analysis.plot import plot_runs, plot_table

    if bool(args.run_dirs) == bool(args.table):
        raise SlmError("give run folders, or --table EVAL_TABLE (written by `slm eval --out`)")
    if args.table:
        out = plot_table(Path(args.table), Path(args.out))
        print(f"plotted {args.table} to {out}")
        return
    out = plot_runs([Path(f) for f in args.run_dirs], Path(args.out))
    print(f"plotted {len(args.run_dirs)} run(s) to {out}")


def cmd_batches(args: argparse.Namespace) -> None:
    from slm.analysis.batches import Batches, Processes, read_only, run_config

    target = Path(args.target)
    if not target.exists():
        raise SlmError(f"{target}: no such run folder or config yaml")
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.suffix != ".parquet":
            raise SlmError(f"--out {out}: write a .parquet file")
        refuse_to_clobber(out, args.overwrite)
    cfg, recorded = run_config(target)
    ranks = args.world_size or recorded or 1
    if ranks % args.nodes:
        raise SlmError(f"--world-size {ranks} does not split over --nodes {args.nodes}")
    from slm.core import streaming_workarounds
    with tempfile.TemporaryDirectory(prefix="slm-batches-") as scratch, streaming_workarounds.streaming_datasets():
        folders = read_only(cfg, Path(scratch), "slm batches") if target.is_dir() else None
        world = Processes(args.nodes, ranks // args.nodes, max(cfg.data.num_workers, 1))
        _show_batches(args, Batches(cfg, world, folders), ranks, out)


def _show_batches(args: argparse.Namespace, batches: Batches, ranks: int, out: Path | None) -> None:
    """Show what `slm batches` prints or writes of `batches`."""
    from slm.analysis.batches import parse_steps

    first, last = parse_steps(args.steps, batches.max_steps())
    if args.rank is not None and not 0 <= args.rank < ranks:
        raise SlmError(f"--rank {args.rank}: the run has ranks 0-{ranks - 1}")
    documents = args.documents or args.text
    rows = batches.samples(first, last, [args.rank] if args.rank is not None else list(range(ranks)), args.tokens,
                           documents)
    texts = {}
    if documents and any(row["documents"] is None for row in rows):
        print("slm batches: note: shards written before slm recorded documents (no slm-documents.npz): "
              "samples only; re-run `slm tokenize` for documents", file=sys.stderr)
    if args.text:
        texts = _document_texts(batches, rows, args.source or [])
    if out is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([{k: v for k, v in row.items() if k != "global_id"} for row in rows]),
                       out)
        print(f"wrote {len(rows):,} samples of steps {first}-{last} to {out}")
        return
    for row in rows:
        print(f"step {row['step']} rank {row['rank']} [{row['position']}]: {row['stream']} sample {row['sample']} "
              f"(shard {row['shard']}, row {row['row']}, epoch {row['epoch']})"
              + (f" documents {', '.join(map(str, row['documents']))}" if row.get("documents") else ""))
        if args.tokens:
            print("  tokens: " + " ".join(map(str, row["tokens"])))
        for document in (row.get("documents") or []) if args.text else []:
            print(f"  document {document}: {texts[(row['stream'], document)]}")


def _document_texts(batches, rows: list[dict], sources: list[str]) -> dict[tuple[str, int], str]:
    """Return the text of each document the rows name, read from the source you name (`--source`, for every stream or
    as STREAM=DATASET), with the feature and split `slm tokenize` recorded. The source a shard folder records is only
    shown, never opened: the folder may be someone else's, and that path any file of yours."""
    from slm.data.documents import load_documents
    from slm.data.shards import read_metadata

    streams = sorted({row["stream"] for row in rows if row.get("documents")})
    named = {}
    for source in sources:
        stream, _, dataset = source.partition("=")
        named.update({stream: dataset} if dataset and stream in batches.streams else {"": source})
    texts = {}
    for stream in streams:
        source = read_metadata(batches.stream_folder(stream)).get("source") or {}
        dataset = named.get(stream) or named.get("")
        if not dataset:
            recorded = f"record {source['dataset']!r}" if source.get("dataset") else "record no source"
            raise SlmError(f"--text reads the documents' text from their source, which slm opens only when you name "
                           f"it: the shards of {stream} {recorded}; name it with --source DATASET"
                           + (" (or STREAM=DATASET)" if len(batches.streams) > 1 else ""))
        if not (source.get("feature") and source.get("split")):
            raise SlmError(f"the shards of {stream} do not record the feature and split they were tokenized from: "
                           "--text cannot find the documents")
        ds = load_documents(dataset, source["feature"], source["split"], source.get("txt_by"))
        for row in rows:
            for document in (row.get("documents") or []) if row["stream"] == stream else []:
                texts[(stream, document)] = ds[document][source["feature"]]
    return texts


def cmd_status(args: argparse.Namespace) -> None:
    from slm.analysis.status import format_status, run_status

    print(format_status([run_status(Path(target)) for target in args.targets], args.json))


def cmd_verify(args: argparse.Namespace) -> int:
    from slm.analysis.verify import verify
    from slm.core.config_rules import HUB_REPO
    from slm.core.foreign import read_yaml, shown
    from slm.core.run_folder import checked_run_folder

    target, run = args.target, Path(args.run_folder) if args.run_folder else None
    if Path(target).is_dir():  # a run folder: its repo, and its checkpoints
        config = checked_run_folder(target) / "config.yaml"
        if not config.is_file():
            raise SlmError(f"{target} is no run folder (no config.yaml): give a Hub repo ORG/NAME or a run folder")
        run = run or Path(target)
        saved = read_yaml(config, "config")  # a folder handed over: read, not run
        hub = saved.get("hub") if isinstance(saved, dict) else None
        target = hub.get("repo") if isinstance(hub, dict) else None
        if not target:
            raise SlmError(f"{config} has no hub.repo: give the Hub repo, e.g. slm verify ORG/NAME --run {args.target}")
        if not isinstance(target, str) or not HUB_REPO.fullmatch(target):
            raise SlmError(f"{config}: hub.repo {shown(target)} is no Hub repo id ORG/NAME")
    elif target.count("/") != 1:
        raise SlmError(f"{target} is neither a run folder nor a Hub model repo ORG/NAME")
    if run is not None and not run.is_dir():
        raise SlmError(f"--run {run}: no such run folder")
    if run is not None:
        checked_run_folder(run)
    report = verify(target, args.revision, run, args.deep)
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.ok else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    from slm.cluster.sweep import main

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

    p = sub.add_parser("eval", parents=[common], help="evaluate models or every checkpoint of runs on MDS shards "
                                                       "and lm-evaluation-harness tasks",
                       description="Cross-entropy (nats), perplexity, next-token accuracy and bits per byte on an "
                                   "MDS folder (--data), and the scores of lm-evaluation-harness tasks (--tasks, "
                                   "the optional analysis extra): of one checkpoint or exported model, printed as "
                                   "JSON; or, with --out, of every checkpoint of each MODEL (run folders, Hub "
                                   "repos) into one table with a row per (model, run, batch, tokens, parameters, "
                                   "data, metric), skipping what is already in it.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="checkpoint file of slm/train.py, folder written by `slm export`, run folder (its complete "
                        "checkpoints) or Hub model repo ORG/NAME (its ba{B} branches)")
    p.add_argument("--out", help="table to write or extend: FILE.parquet or FILE.csv")
    p.add_argument("--checkpoints", default="all", help="with --out: 'all' or labels such as ba400,ba800 "
                                                        "(default: all)")
    p.add_argument("-d", "--data", help="MDS folder written by `slm tokenize`")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="lm-evaluation-harness tasks or groups (e.g. blimp, blimp_anaphor_gender_agreement); rows "
                        "with data lm-eval:TASK and metric TASK/METRIC")
    p.add_argument("--include-path", metavar="DIR", help="folder of task yamls of your own (lm-eval's include_path)")
    p.add_argument("--limit", type=int, help="with --tasks: the first N documents of each task (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--max-batches", type=int, help="stop after this many batches of --data (default: the whole "
                                                    "folder)")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("logprobs", parents=[common], help="per-token log-probs of a split under every checkpoint",
                       description="For each checkpoint of MODEL, the next-token log-probability of every token of "
                                   "an MDS split, in the split's order: one Parquet table per checkpoint with the "
                                   "columns sample (index in the split), token_ids and logprobs (log p(token i | "
                                   "tokens < i) from float32 log-softmax; NaN at position 0). A checkpoint whose "
                                   "table is already in every output is skipped. Runs on the GPU if there is one "
                                   "(bf16 forward pass, batches sized to its memory). Under a launcher (composer "
                                   "-n N, torchrun) or with RANK and WORLD_SIZE set, each process takes every "
                                   "WORLD_SIZE-th checkpoint.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="run folder (its complete ep*-ba*-rank0.pt), checkpoint file (.pt), folder written by `slm "
                        "export`, or Hub model repo ORG/NAME (its ba{B} branches); several (a suite): each one's "
                        "tables go in --out-dir/NAME, NAME the end of its path")
    p.add_argument("-d", "--data", required=True, help="MDS folder written by `slm tokenize`")
    p.add_argument("--checkpoints", default="all", help="'all' or labels such as ba400,ba800 (default: all)")
    p.add_argument("--out-dir", help="folder for LABEL.parquet, one per checkpoint")
    p.add_argument("--out-repo", help="Hub dataset repo to push to (one MODEL): branch LABEL holds logprobs.parquet "
                                      "(created private if missing)")
    p.add_argument("--batch-size", type=int, help="samples a batch (default: 16 on a CPU; on a GPU, sized to its "
                                                  "free memory)")
    p.add_argument("--precision", choices=("float32", "bf16"), help="of the forward pass; the log-softmax is float32 "
                                                                    "either way (default: bf16 on a GPU that has it, "
                                                                    "else float32)")
    p.add_argument("--max-samples", type=int, help="only the first this many samples (default: the whole split)")
    p.set_defaults(run=cmd_logprobs)

    p = sub.add_parser("dynamics", parents=[common], help="per-token loss, age of acquisition and forgetting over "
                                                          "a run's checkpoints",
                       description="From the per-token log-probs of every checkpoint of a run on an MDS split (slm "
                                   "logprobs' tables, reused from --logprobs where they are there), a table with a "
                                   "row per (sample, position): the loss at every checkpoint, the final loss, the "
                                   "age of acquisition (the first checkpoint from which the loss stays within "
                                   "--margin nats of its final value), the forgettings (rises by more than "
                                   "--margin between checkpoints) and the source document; and OUT-tokens.parquet, "
                                   "the same per token id (docs/analysis.md).")
    p.add_argument("model", help="run folder (its complete checkpoints) or Hub model repo ORG/NAME (its ba{B} "
                                 "branches)")
    p.add_argument("-d", "--data", required=True, help="MDS folder written by `slm tokenize`")
    p.add_argument("-o", "--out", required=True, help="Parquet table to write (and OUT-tokens.parquet beside it)")
    p.add_argument("--margin", type=float, default=0.1, help="nats (default: %(default)s)")
    p.add_argument("--max-samples", type=int, help="only the first this many samples (default: the whole split)")
    p.add_argument("--logprobs", help="folder of `slm logprobs --out-dir` tables (LABEL.parquet) to reuse")
    p.add_argument("--chunk-samples", type=int, metavar="N", help="samples a chunk (default: as many as fit in 2 GiB "
                   "with every checkpoint's losses): memory is bounded by a chunk, whatever the split's size")
    p.add_argument("--batch-size", type=int, help="samples a batch of the tables computed (default: 16 on a CPU; on "
                                                  "a GPU, sized to its free memory)")
    p.add_argument("--plot", help="also draw the loss of chosen tokens over tokens seen and the distribution of the "
                                  "ages of acquisition to this PNG")
    p.add_argument("--plot-tokens", help="token ids to draw, comma-separated (default: the 8 most frequent)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(run=cmd_dynamics)

    p = sub.add_parser("plot", parents=[common], help="draw loss, eval loss and lr curves of runs to a PNG",
                       description="Overlay the curves of one or more runs (their save_folder, e.g. "
                                   "checkpoints/llama-1m) and, for a suite, last eval loss against parameters.")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run folder holding metrics.jsonl and run.json")
    p.add_argument("--table", help="instead: an eval table of `slm eval --out`: every checkpoint's eval loss over "
                                   "tokens, and the final loss against parameters with a power-law fit per "
                                   "architecture")
    p.add_argument("-o", "--out", default="curves.png", help="PNG file to write (default: curves.png)")
    p.set_defaults(run=cmd_plot)

    p = sub.add_parser("batches", parents=[common], help="the exact samples each rank trains on at each step",
                       description="For each step of a run (or of a config, before it runs), the samples every "
                                   "rank trains on: the stream, the sample's index in it, its shard and row, "
                                   "computed from the config and the shards with Streaming's own partitioning, "
                                   "without training; optionally their tokens and the source documents they hold.")
    p.add_argument("target", metavar="RUN_FOLDER_OR_CONFIG", help="run folder (its config.yaml and world size) or "
                                                                  "a training yaml")
    p.add_argument("--steps", default="1", help="A:B (inclusive, from 1), A: (to max_duration) or A (default: 1)")
    p.add_argument("--rank", type=int, help="only this rank (default: every rank)")
    p.add_argument("--world-size", type=int, help="training processes (default: the run's, else 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the processes are on (default: %(default)s)")
    p.add_argument("--tokens", action="store_true", help="also each sample's token ids")
    p.add_argument("--documents", action="store_true", help="also the source documents each sample holds "
                                                            "(their index in the split slm tokenize read)")
    p.add_argument("--text", action="store_true", help="also the text of those documents (implies --documents), read "
                                                       "from --source")
    p.add_argument("--source", action="append", metavar="[STREAM=]DATASET",
                   help="with --text: the dataset the shards were tokenized from (as `slm tokenize -i` took it; the "
                        "shards record it, but slm opens only a source you name); STREAM=DATASET for one stream of a "
                        "mixture; repeat for several")
    p.add_argument("--out", help="write a Parquet table (one row per sample) instead of printing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(run=cmd_batches)

    p = sub.add_parser("status", parents=[common], help="where each run of a suite stands",
                       description="One row per run: model, parameters, batch reached of max_duration, tokens, the "
                                   "last train and eval loss, the newest checkpoint and its age, Hub uploads "
                                   "pending, and whether it finished, stopped (preempted or Ctrl-C), failed, was "
                                   "killed, is running, or never started.")
    p.add_argument("targets", nargs="+", metavar="RUN_FOLDER_OR_CONFIG",
                   help="run folders, or the yamls of a suite (their run folders, started or not)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(run=cmd_status)

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

    # slm.cluster.sweep parses its own arguments (options and configs in any order, which a subparser cannot): this one
    # takes everything after `sweep` as it is (no prefix character anyone types, so no option of its own).
    p = sub.add_parser("train", prefix_chars="\0", add_help=False, help="train one model: CONFIG.yaml... "
                       "[key=value ...], what slm/train.py runs, as one process (slm train --help)")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(run=None)  # main() hands `slm train ...` to slm/train.py's command line before parsing

    p = sub.add_parser("sweep", prefix_chars="\0", add_help=False, help="list the tasks of a grid sweep, "
                       "as jobs/suite.sbatch and jobs/suite.sh run them (slm sweep --help)")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(run=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if "train" in words[:2] and set(words[:words.index("train")]) <= {"--debug"}:
        from slm.train import command  # slm/train.py's own command line, as the whole process

        return command(words[words.index("train") + 1:] + words[:words.index("train")], prog="slm train")
    args = build_parser().parse_args(argv)
    return run_command(f"slm {args.command}", lambda: args.run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
