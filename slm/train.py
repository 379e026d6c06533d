"""Train one model with Composer's Trainer.

    slm train CONFIG.yaml [MORE.yaml ...] [key=value ...]        (one process)
    python slm/train.py CONFIG.yaml [MORE.yaml ...] [key=value ...]
    composer -n N slm/train.py CONFIG.yaml [MORE.yaml ...] [key=value ...]
    composer -n N -m slm.train CONFIG.yaml [MORE.yaml ...] [key=value ...]
    torchrun --nproc-per-node N slm/train.py CONFIG.yaml [MORE.yaml ...] [key=value ...]

All run this same code (slm.training.trainer). Several yamls merge left to right (each with its own `base:` chain),
then the overrides; run_name defaults to the yamls' stems joined by '+'. Running again with the same run_name resumes
from the newest complete checkpoint in checkpoints/RUN_NAME/ (model, optimizer, scheduler, RNG and the exact
position in the Streaming data order); a larger max_duration continues a run, its learning rate continuous
(docs/design.md, "Schedules"). SIGTERM, SIGUSR1 or SIGUSR2 (a scheduler's warning) stops it at the end of the current
batch with a checkpoint and exit status 75, ready to resume.
"""

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":
    # Python put this file's folder first on sys.path, so every subpackage of slm would also be importable under
    # its bare name (`data`, `training`, ...) and shadow an installed package of that name: slm is a package.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def parse(argv: list[str] | None, prog: str) -> argparse.Namespace:
    """Parse the command line of a training run (None: the process's)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     usage="%(prog)s [-v | -s | --loglevel LEVEL] [--debug] CONFIG.yaml [MORE.yaml "
                                           "...] [key=value ...] [--overrides key=value ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", metavar="ARG",
                        help="yaml files, merged left to right (e.g. yamls/mamba-100k.yaml cooldown.yaml), then "
                             "config overrides (e.g. max_duration=50ba; hub.repo='' or logging.wandb.project='': off)")
    parser.add_argument("--overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, as delphi and llm-foundry take them: the same as bare key=value")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="store_const", const="INFO", dest="loglevel",
                       help="Composer's and slm's log at INFO")
    level.add_argument("-s", "--silent", action="store_const", const="ERROR", dest="loglevel",
                       help="errors only: no progress lines, bar or console metrics")
    level.add_argument("--loglevel", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                       help="Composer's and slm's log level (default: WARNING)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    bad = [a for a in args.overrides if "=" not in a]
    if bad:
        parser.error(f"--overrides takes key=value, got {bad[0]!r}")
    if not [a for a in args.args if "=" not in a]:
        parser.error("give a CONFIG.yaml (e.g. yamls/mamba-100k.yaml)")
    return args


def _train(args: argparse.Namespace, owns_process: bool) -> int:
    """Set the log level asked, then train the run the parsed arguments name (`owns_process`: as `command` does);
    return the exit status."""
    from slm.core.errors import set_log_level
    from slm.training.trainer import train_command  # torch loads only now: --help answers at once

    if args.loglevel:
        set_log_level(args.loglevel)
    return train_command([a for a in args.args if "=" not in a],
                         [a for a in args.args if "=" in a] + args.overrides, args.debug, owns_process)


def main(argv: list[str] | None = None) -> int:
    """Train the run the arguments name (None: the command line's) from Python (a notebook, tests) and return the
    exit status; the process's signal handlers are its own again afterwards."""
    return _train(parse(argv, "slm/train.py"), owns_process=False)


def command(argv: list[str] | None = None, prog: str = "slm/train.py") -> int:
    """Train the run the arguments name (None: the command line's) as the whole process (`slm train`, the script,
    a launcher's workers) and return the exit status: the run keeps the signals it takes until the process exits."""
    return _train(parse(argv, prog), owns_process=True)


if __name__ == "__main__":
    sys.exit(command())
