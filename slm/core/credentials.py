"""The secrets slm can see, found by one rule (docs/security.md, "Secrets"), and the checks that keep them out of what
slm writes, uploads and shows.

A secret is
- the value of an environment variable whose name ends in TOKEN, SECRET, PASSWORD, PASSWD or KEY: HF_TOKEN,
  HUGGING_FACE_HUB_TOKEN, GITHUB_TOKEN, WANDB_API_KEY, OPENAI_API_KEY, AWS_SECRET_ACCESS_KEY, PGPASSWORD, ...
  (not HF_TOKEN_PATH or TOKENIZERS_PARALLELISM, which only mention one);
- the Hub login's tokens (`huggingface-cli login`: its token file, and every token it stored);
- every password of the netrc file (the one $NETRC names, else ~/.netrc: where `wandb login` keeps its key);
when it is 8 characters or longer (a shorter value, a flag or a port, is no secret and would mask half of every line).
The tokens themselves are read by huggingface_hub and wandb; slm reads them only to keep them out.
"""

from __future__ import annotations

import netrc
import os
import re
from collections.abc import Iterator
from typing import Any

SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|KEY)$")
SHORTEST_SECRET = 8


def is_secret_name(name: str) -> bool:
    """Return whether an environment variable of this name holds a secret, by the rule above."""
    return bool(SECRET_NAME.search(name.upper()))


def _hub_tokens() -> Iterator[str]:
    """Yield the Hub's tokens: the one it would use (HF_TOKEN and its older names come first there), the login's token
    file whatever the environment says, and every stored login."""
    try:
        import huggingface_hub
        from huggingface_hub import constants

        yield huggingface_hub.get_token() or ""
        with open(constants.HF_TOKEN_PATH) as f:
            yield f.read().strip()
    except Exception:  # noqa: BLE001 - no token file, or an unreadable one: no token there to keep out
        pass
    try:
        from huggingface_hub import get_stored_tokens  # several logins (huggingface_hub >= 0.25)

        yield from get_stored_tokens().values()
    except Exception:  # noqa: BLE001
        return


def _netrc_passwords() -> Iterator[str]:
    """Yield every password of the netrc file ($NETRC, else ~/.netrc); none where it is missing or unparsable."""
    try:  # named explicitly: Python refuses a ~/.netrc others may read, whose passwords are no less secret
        hosts = netrc.netrc(os.environ.get("NETRC") or os.path.expanduser("~/.netrc")).hosts
    except (OSError, netrc.NetrcParseError):
        return
    yield from (password for _, _, password in hosts.values() if password)


def known_secrets() -> list[str]:
    """Return the secrets this process can see, longest first."""
    found = {value for name, value in os.environ.items() if is_secret_name(name)}
    found.update(_hub_tokens())
    found.update(_netrc_passwords())
    return sorted((s for s in found if len(s) >= SHORTEST_SECRET), key=len, reverse=True)


def masked(text: str) -> str:
    """Return `text` with every known secret replaced by `***`."""
    for secret in known_secrets():
        text = text.replace(secret, "***")
    return text


def secret_place(values: Any, secrets: list[str] | None = None) -> str | None:
    """Return where in `values` (a config, a record: strings anywhere inside) a known secret is, as a dotted key ("" for
    `values` itself), or None where there is none."""
    secrets = known_secrets() if secrets is None else secrets
    if isinstance(values, dict):
        for key, value in values.items():
            inner = secret_place(value, secrets)
            if inner is not None:
                return f"{key}{'' if not inner or inner[0] == '[' else '.'}{inner}"
    elif isinstance(values, (list, tuple)):
        for i, value in enumerate(values):
            inner = secret_place(value, secrets)
            if inner is not None:
                return f"[{i}]{'.' + inner if inner else ''}"
    elif isinstance(values, (str, bytes)):
        data = values.encode() if isinstance(values, str) else values
        return "" if any(secret.encode() in data for secret in secrets) else None
    return None


def file_holds_secret(path: str | os.PathLike, secrets: list[str] | None = None) -> bool:
    """Return whether a file's bytes hold a known secret (read mapped, not into memory: a checkpoint may be large)."""
    import mmap

    secrets = known_secrets() if secrets is None else secrets
    with open(path, "rb") as f:
        if not secrets or os.fstat(f.fileno()).st_size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return any(data.find(secret.encode()) != -1 for secret in secrets)
