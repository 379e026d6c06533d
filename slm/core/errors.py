"""What a command says on stderr: its progress lines (`say`), and the one error path every entry point takes for
errors a user can act on (the one exception type for problems a user can fix, disk errors, also the user's to fix).
No secret is ever in either: an error's message is masked when it is made (slm/core/credentials.py)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from slm.core.credentials import known_secrets, masked

DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system"}


class SlmError(Exception):
    """A bad input or config: the CLI prints it as one line and exits non-zero. Its message has every known secret
    masked, wherever it is shown (a line, a traceback, a notebook)."""

    def __init__(self, message: str = ""):
        super().__init__(masked(str(message)))


class Refused(SlmError):
    """Input from elsewhere that slm will not use: it could run code, reach outside its folder, hold a secret, or is
    not what slm writes (docs/security.md). `file`: the file refused, as the message names it."""

    def __init__(self, message: str, file: str | None = None):
        super().__init__(message)
        self.file = file


def disk_error(e: BaseException, where: str | None = None) -> str | None:
    """Return one line for a full or read-only disk anywhere in the exception's chain (torch.save, for one, wraps
    the OSError in a RuntimeError), naming the file, else `where`; None for anything else."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            target = e.filename or where
            return (f"{DISK_ERRORS[e.errno]}{f' writing {target}' if target else ''}: free space or write "
                    "elsewhere, then run the command again")
        e = e.__cause__ or e.__context__
    return None


def describe_error(e: BaseException) -> str:
    """Return the one line a user sees for an exception (the run state file keeps it too), secrets masked."""
    if isinstance(e, SlmError):
        return str(e)
    text = str(e).strip().splitlines()
    return masked(disk_error(e) or f"{type(e).__name__}: {text[0] if text else ''} (rerun with --debug for the "
                  "traceback)")


LOG = logging.getLogger("slm")  # its level is slm's log level (`slm train -v`, `-s`, `--loglevel`); unset: WARNING


def set_log_level(level: str) -> None:
    """Set slm's log level (and so Composer's, which the Trainer takes from it): DEBUG, INFO, WARNING, ERROR or
    CRITICAL; at ERROR and above the progress lines, bars and console metrics are off."""
    LOG.setLevel(level.upper())


def progress_shown() -> bool:
    """Whether progress lines, bars and console metrics are shown: slm's log level is below ERROR."""
    return LOG.getEffectiveLevel() < logging.ERROR


def say(text: str, prog: str = "slm train", in_signal_handler: bool = False) -> None:
    """Print the progress line `PROG: TEXT` on stderr, from rank 0 only (RANK, as Composer's launcher sets it; unset:
    the one process), unless slm's log level hides progress (`progress_shown`). In a signal handler it is one write
    to file descriptor 2: the buffered stream may be in the middle of a write in the code the signal interrupted."""
    if os.environ.get("RANK", "0") != "0" or not progress_shown():
        return
    if in_signal_handler:
        os.write(2, f"{prog}: {text}\n".encode())
    else:
        print(f"{prog}: {text}", file=sys.stderr, flush=True)


class _Masked:
    """A text stream writing to `stream` with each of `secrets` replaced by `***` (anything else it is asked, it
    passes on)."""

    def __init__(self, stream: TextIO, secrets: list[str]):
        self._stream, self._secrets = stream, secrets

    def write(self, text: str) -> int:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def masked_output() -> Iterator[None]:
    """Mask every known secret in what is printed on stdout and stderr meanwhile (a name read from elsewhere, a
    report of someone's repo): the one place where a command's output passes."""
    secrets = known_secrets()
    if not secrets:
        yield
        return
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Masked(sys.stdout, secrets), _Masked(sys.stderr, secrets)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = streams


def run_command(prog: str, action: Callable[[], int | None], debug: bool = False) -> int:
    """Run `action` through the one error path of every slm entry point (`slm`, `slm/train.py`,
    `python -m slm.cluster.launch`).

    Runs `action` and returns its exit status. Any error becomes one line, `PROG: error: ...`, and
    status 1; with `debug` (the `--debug` flag) the full traceback, causes included, comes first. Secrets (tokens
    this process can see) are masked in both, and in everything the action prints (`masked_output`).
    Of several processes of one run, rank 0 says the line as it is and the others name their rank: Composer's
    launcher shows another rank's output only when that rank failed, so an error of that rank alone is seen too.
    Ctrl-C says "interrupted" and returns 130; importing Composer replaces Python's Ctrl-C handling with a silent
    exit, so it is put back first (training answers Ctrl-C its own way once it starts: slm/training/preemption.py).
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) not in (
            signal.SIG_IGN, signal.SIG_DFL, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with masked_output():
            return action() or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            print(masked(traceback.format_exc()), file=sys.stderr, end="")
        rank = os.environ.get("RANK", "0")
        print(f"{prog}: error{'' if rank == '0' else f' (rank {rank})'}: {describe_error(e)}", file=sys.stderr,
              flush=True)
        return 1
