"""What slm refuses from outside (docs/security.md): pickles that name code, names that leave their folder, secrets
in what it writes.

- Checkpoints: every checkpoint slm or Composer opens is unpickled with `torch.load(weights_only=True)`, allowing
  only the globals an slm checkpoint holds (`checkpoint_globals`); a file naming any other is refused in one line
  before anything of it runs (Composer's own loads come here through slm/core/workarounds.py).
- Names read from files that become paths (shard basenames in index.json, Hub download names): `plain_name`
  refuses one that leads outside its folder (a `latest` pointer's text: `slm.hub.manifest.checked_remote_name`).
- Secrets: `known_secrets` are the tokens slm can see (token-like environment variables and the Hub login's);
  `refuse_secrets` stops a value holding one from being written, `masked` hides them in what is printed.
"""

from __future__ import annotations

import datetime
import functools
import netrc
import os
import pickle
import re
from pathlib import Path
from typing import Any

from slm.core.errors import SlmError


class Refused(SlmError):
    """Input from outside that slm will not use: it could run code, reach outside its folder or hold a secret.
    `file`: the file refused, as the message names it."""

    def __init__(self, message: str, file: str | None = None):
        super().__init__(message)
        self.file = file


@functools.cache
def checkpoint_globals() -> list[Any]:
    """Return the globals an slm checkpoint's pickle names beyond what weights_only allows by default: Composer's RNG
    states (numpy uint32 arrays, named as the installed numpy pickles them), its timestamp's wall-clock times
    (timedelta) and its torch version record (TorchVersion, a str)."""
    import numpy
    import torch

    array = numpy.zeros(1, dtype=numpy.uint32)
    return [datetime.timedelta, torch.torch_version.TorchVersion, numpy.ndarray, numpy.dtype, type(array.dtype),
            array.__reduce__()[0]]


def _name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def refuse_foreign_globals(path: Path | str) -> None:
    """Refuse a checkpoint file whose pickle names a global slm's checkpoints never hold (read, not run)."""
    import torch

    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except FileNotFoundError:
        raise SlmError(f"checkpoint not found: {path}") from None
    except Exception as e:  # not a zip of torch.save: torch.load says why
        raise SlmError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from e
    foreign = sorted(set(named) - {_name(g) for g in checkpoint_globals()})
    if foreign:
        raise Refused(f"refused checkpoint {path}: its pickle names {foreign[0]}, which slm checkpoints never hold "
                       "and which would run code on loading (docs/security.md); nothing of it was loaded", str(path))


def unpickle_checkpoint(path: Path | str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """Unpickle a checkpoint file, allowing only the globals of `checkpoint_globals()`: a foreign one is refused
    in one line, nothing of it run."""
    import torch

    refuse_foreign_globals(path)
    try:
        with torch.serialization.safe_globals(checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # a construct weights_only refuses, beyond the globals checked above
        raise Refused(f"refused checkpoint {path}: {str(e).strip().splitlines()[0]} (docs/security.md)",
                      str(path)) from e
    except Exception as e:  # a torn file
        raise SlmError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from e


def plain_name(name: Any, what: str, below: bool = False) -> str:
    """Return `name` (read from a file) if it is a plain file name (with `below`, a relative path that only goes down),
    else refuse it in one line naming `what`: an absolute path, `..`, `.`, an empty part or a backslash would lead
    outside the folder it is joined to."""
    parts = name.split("/") if isinstance(name, str) else [""]
    if any(p in ("", ".", "..") for p in parts) or "\\" in name or "\0" in name or (len(parts) > 1 and not below):
        kind = "a relative path below its folder" if below else "a plain file name"
        raise Refused(f"{what} names {name!r}, which is not {kind}: refused, since it would lead outside its "
                      "folder (docs/security.md)")
    return name


# Environment variables whose values are secrets: tokens, keys, passwords (HF_TOKEN, WANDB_API_KEY,
# AWS_SECRET_ACCESS_KEY, ...); not those that only mention one (HF_TOKEN_PATH, TOKENIZERS_PARALLELISM).
SECRET_VARIABLE = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|KEY)$")
SHORTEST_SECRET = 8  # shorter values (a flag, a port) are no secrets and would mask half of every message


def known_secrets() -> list[str]:
    """Return the secrets slm can see, longest first: token-like environment variables, the Hub login's token
    (`huggingface-cli login`) and the passwords in ~/.netrc (where `wandb login` keeps its key)."""
    found = {value for name, value in os.environ.items() if SECRET_VARIABLE.search(name.upper())}
    try:
        from huggingface_hub import get_token

        found.add(get_token() or "")
    except Exception:  # an unreadable token file: no token to hide
        pass
    try:
        found.update(password for _, _, password in netrc.netrc().hosts.values() if password)
    except (OSError, netrc.NetrcParseError):
        pass
    return sorted((s for s in found if len(s) >= SHORTEST_SECRET), key=len, reverse=True)


def masked(text: str) -> str:
    """Return `text` with every known secret replaced by `***`."""
    for secret in known_secrets():
        text = text.replace(secret, "***")
    return text


def refuse_secrets(values: Any, where: str) -> None:
    """Refuse to write `values` (a config, a record; strings anywhere inside) when one holds a known secret,
    naming its key, never the value."""
    secrets = known_secrets()
    if not secrets:
        return

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        elif isinstance(value, str) and any(secret in value for secret in secrets):
            raise Refused(f"{where}: '{key or 'the text'}' holds a secret (the value of a token, key or password "
                          "this process can see); slm never writes one to a file: give the value another way")

    walk(values, "")
