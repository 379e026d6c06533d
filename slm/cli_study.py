"""The `slm` commands that study trained models: export, generate, eval, logprobs, dynamics, plot (each one's
arguments, then its handler)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from slm.core.errors import SlmError
from slm.core.paths import places, refuse_to_clobber, require_output

if TYPE_CHECKING:  # each command imports what it needs when it runs: `slm --help` starts at once
    from collections.abc import Callable


def add_export(new_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `slm export` and its arguments."""
    p = new_command("export", help="export a checkpoint as a HuggingFace model folder",
                    description="Write a save_pretrained folder (model, tokenizer, model card, slm-run.json) "
                                "from a checkpoint of slm/train.py, e.g. checkpoints/RUN/latest-rank0.pt.")
    p.add_argument("checkpoint", help="checkpoint file (.pt) written by slm/train.py")
    p.add_argument("-o", "--out-dir", help="folder to write")
    p.add_argument("--out-repo", help="Hub model repo to push the export to (created private if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    p.set_defaults(run=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    """Export a checkpoint as a HuggingFace model folder, locally and/or to a Hub repo."""
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


def add_generate(new_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `slm generate` and its arguments."""
    p = new_command("generate", help="sample text from an exported model",
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


def cmd_generate(args: argparse.Namespace) -> None:
    """Print samples continuing --prompt from an exported model."""
    from slm.analysis.generate import generate

    if args.max_new_tokens < 1:
        raise SlmError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    for i, text in enumerate(generate(args.model, args.prompt, args.max_new_tokens, args.temperature,
                                      args.top_k or None, args.seed, args.num_samples)):
        print(("\n" if i else "") + text)


def add_eval(new_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `slm eval` and its arguments."""
    p = new_command("eval", help="evaluate models or every checkpoint of runs on MDS shards "
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


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate one model (printed as JSON) or every checkpoint of the models given (into --out)."""
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


def add_logprobs(new_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `slm logprobs` and its arguments."""
    p = new_command("logprobs", help="per-token log-probs of a split under every checkpoint",
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


def cmd_logprobs(args: argparse.Namespace) -> None:
    """Write each checkpoint's per-token log-probs of a split, one table per checkpoint."""
    from slm.analysis.logprobs import Reading, write_logprobs

    write_logprobs(args.models, Path(args.data), Path(args.out_dir) if args.out_dir else None, args.out_repo,
                   args.checkpoints, Reading(args.batch_size, args.precision), args.max_samples)


def add_dynamics(new_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `slm dynamics` and its arguments."""
    p = new_command("dynamics", help="per-token loss, age of acquisition and forgetting over "
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


def cmd_dynamics(args: argparse.Namespace) -> None:
    """Write a run's per-token learning dynamics over its checkpoints, and optionally plot them."""
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


def add_plot(new_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `slm plot` and its arguments."""
    p = new_command("plot", help="draw loss, eval loss and lr curves of runs to a PNG",
                    description="Overlay the curves of one or more runs (their save_folder, e.g. "
                                "checkpoints/llama-1m) and, for a suite, last eval loss against parameters.")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run folder holding metrics.jsonl and run.json")
    p.add_argument("--table", help="instead: an eval table of `slm eval --out`: every checkpoint's eval loss over "
                                   "tokens, and the final loss against parameters with a power-law fit per "
                                   "architecture")
    p.add_argument("-o", "--out", default="curves.png", help="PNG file to write (default: curves.png)")
    p.set_defaults(run=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> None:
    """Draw the curves of run folders, or of an eval table, to a PNG."""
    from slm.analysis.plot import plot_runs, plot_table

    if bool(args.run_dirs) == bool(args.table):
        raise SlmError("give run folders, or --table EVAL_TABLE (written by `slm eval --out`)")
    if args.table:
        out = plot_table(Path(args.table), Path(args.out))
        print(f"plotted {args.table} to {out}")
        return
    out = plot_runs([Path(f) for f in args.run_dirs], Path(args.out))
    print(f"plotted {len(args.run_dirs)} run(s) to {out}")
