"""slm's workarounds of W&B's behaviour (the policy and the versions: slm/core/workarounds.py): its login
checked before the Trainer starts it. (Composer's W&B logger, mended, is slm/core/composer_workarounds.py's `WandB`.)
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from slm.core.errors import SlmError
from slm.core.workarounds import require


def check_wandb_login(project: str) -> None:
    """Refuse W&B logging that would stop at start on a missing login.

    wandb.init (wandb/sdk/wandb_login.py), called inside Composer's Trainer(), raises a long
    traceback when there is no API key; this looks where wandb looks (WANDB_MODE, WANDB_API_KEY,
    its settings file, the netrc entry for its host) before anything starts.
    """
    require("wandb", "the W&B login check")
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    settings = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb")) / "settings"
    if settings.is_file() and any(line.replace(" ", "") in ("mode=offline", "mode=disabled")
                                  for line in settings.read_text().splitlines()):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise SlmError(f"logging.wandb.project is {project} but there is no W&B login for {host}: run `wandb login`, "
                   "set WANDB_API_KEY, or set WANDB_MODE=offline to log locally")
