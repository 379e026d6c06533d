"""The `slm` command: one subcommand per pipeline stage, each defined beside its handler in slm/cli_data.py (making
data), slm/cli_study.py (studying trained models) and slm/cli_runs.py (runs: train, sweep, status, batches, verify)."""

from __future__ import annotations

import argparse
import sys

from slm import cli_data, cli_runs, cli_study
from slm.core.errors import run_command

COMMANDS = (cli_data.add_corpus, cli_data.add_tokenizer, cli_data.add_tokenize, cli_study.add_export,
            cli_study.add_generate, cli_study.add_eval, cli_study.add_logprobs, cli_study.add_dynamics,
            cli_study.add_plot, cli_runs.add_batches, cli_runs.add_status, cli_runs.add_verify, cli_runs.add_train,
            cli_runs.add_sweep)


def build_parser() -> argparse.ArgumentParser:
    """Return the `slm` command's parser: `--debug` and the subcommands of COMMANDS, in the order --help lists them."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser = argparse.ArgumentParser(prog="slm", parents=[common],
                                     description="Train suites of small language models (llama, mamba, any causal LM).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def new_command(name: str, **kwargs) -> argparse.ArgumentParser:
        kwargs.setdefault("parents", [common])
        return sub.add_parser(name, **kwargs)

    for add in COMMANDS:
        add(new_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `slm` command line `argv` (default: sys.argv) and return its exit status."""
    words = sys.argv[1:] if argv is None else argv
    if "train" in words[:2] and set(words[:words.index("train")]) <= {"--debug"}:
        from slm.train import command  # slm/train.py's own command line, as the whole process

        return command(words[words.index("train") + 1:] + words[:words.index("train")], prog="slm train")
    args = build_parser().parse_args(argv)
    return run_command(f"slm {args.command}", lambda: args.run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
