"""The `slm` commands about runs: train, sweep, status, batches, verify (each one's arguments, then its handler)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from slm.core.errors import SlmError
from slm.core.paths import refuse_to_clobber

if TYPE_CHECKING:  # each command imports what it needs when it runs: `slm --help` starts at once
    from collections.abc import Callable

    from slm.analysis.batches import Batches


def add_train(new_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `slm train` and its arguments."""
    # slm/train.py parses its own arguments: everything after `train` is taken as it is (see add_sweep).
    p = new_command("train", parents=[], prefix_chars="\0", add_help=False, help="train one model: CONFIG.yaml... "
                    "[key=value ...], what slm/train.py runs, as one process (slm train --help)")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(run=None)  # main() hands `slm train ...` to slm/train.py's command line before parsing


def add_sweep(new_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `slm sweep` and its arguments."""
    # slm.cluster.sweep parses its own arguments (options and configs in any order, which a subparser cannot): this
    # one takes everything after `sweep` as it is (no prefix character anyone types, so no option of its own).
    p = new_command("sweep", parents=[], prefix_chars="\0", add_help=False, help="list the tasks of a grid sweep, "
                    "as jobs/suite.sbatch and jobs/suite.sh run them (slm sweep --help)")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(run=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Hand `slm sweep ARGS` to slm/cluster/sweep.py's own command line."""
    from slm.cluster.sweep import main

    return main(args.argv, prog="slm sweep", debug=args.debug)


def add_status(new_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `slm status` and its arguments."""
    p = new_command("status", help="where each run of a suite stands",
                    description="One row per run: model, parameters, batch reached of max_duration, tokens, the "
                                "last train and eval loss, the newest checkpoint and its age, Hub uploads "
                                "pending, and whether it finished, stopped (preempted or Ctrl-C), failed, was "
                                "killed, is running, or never started.")
    p.add_argument("targets", nargs="+", metavar="RUN_FOLDER_OR_CONFIG",
                   help="run folders, or the yamls of a suite (their run folders, started or not)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(run=cmd_status)


def cmd_status(args: argparse.Namespace) -> None:
    """Print a row (or JSON) per run of the run folders and suite yamls given."""
    from slm.analysis.status import format_status, run_status

    print(format_status([run_status(Path(target)) for target in args.targets], args.json))


def add_batches(new_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `slm batches` and its arguments."""
    p = new_command("batches", help="the exact samples each rank trains on at each step",
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


def cmd_batches(args: argparse.Namespace) -> None:
    """Print or write the samples each rank trains on at the steps asked for."""
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


def add_verify(new_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `slm verify` and its arguments."""
    p = new_command("verify", help="check that a run's Hub repo serves what was trained",
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


def cmd_verify(args: argparse.Namespace) -> int:
    """Check a Hub repo (given, or a run folder's hub.repo) against its manifest and run; return 1 on a fault."""
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
