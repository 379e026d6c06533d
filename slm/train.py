"""Train one model with Composer's Trainer.

    python slm/train.py CONFIG.yaml [MORE.yaml ...] [key=value ...]
    composer -n N slm/train.py CONFIG.yaml [MORE.yaml ...] [key=value ...]
    composer -n N -m slm.train CONFIG.yaml [MORE.yaml ...] [key=value ...]

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


def main(argv: list[str] | None = None) -> int:
    """Train the run the arguments name (None: the command line's) and return the exit status. From Python (a
    notebook, tests) the process's signal handlers are its own again afterwards."""
    parser = argparse.ArgumentParser(prog="slm/train.py", description=__doc__,
                                     usage="%(prog)s [--debug] CONFIG.yaml [MORE.yaml ...] [key=value ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="+", metavar="ARG",
                        help="yaml files, merged left to right (e.g. yamls/mamba-100k.yaml cooldown.yaml), then "
                             "config overrides (e.g. max_duration=50ba)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    from slm.training.trainer import train_command  # torch loads only now: --help answers at once

    return train_command([a for a in args.args if "=" not in a], [a for a in args.args if "=" in a], args.debug,
                         from_python=argv is not None)


if __name__ == "__main__":
    sys.exit(main())
