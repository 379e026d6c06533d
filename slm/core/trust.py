"""The checkpoint gate (docs/security.md): every checkpoint slm or Composer opens is checked whole first (no member
compressed, every storage its pickle names there with its size: `slm.core.run_folder.is_complete`), so nothing of a
file is allocated beyond its size, then unpickled with `torch.load(weights_only=True)`, allowing only the globals an
slm checkpoint holds (`checkpoint_globals`): a file naming any other is refused in one line before anything of it
runs. Composer's own loads come here through slm/core/composer_workarounds.py. What is read from elsewhere besides
pickles goes through slm/core/foreign.py; secrets are slm/core/credentials.py's.
"""

from __future__ import annotations

import datetime
import functools
import os
import pickle
from pathlib import Path
from typing import Any

from slm.core.errors import Refused, SlmError
from slm.core.foreign import stored_members
from slm.core.run_folder import is_complete


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
    """Return a global's dotted name (module and qualified name), as torch names the globals of a pickle."""
    return f"{obj.__module__}.{obj.__qualname__}"


def refuse_foreign_globals(path: Path | str) -> None:
    """Refuse a checkpoint file whose pickle names a global slm's checkpoints never hold (read, not run)."""
    import torch

    if not os.path.isfile(path):
        raise SlmError(f"checkpoint not found: {path}")
    stored_members(path, "checkpoint")
    if not is_complete(Path(path)):
        raise SlmError(f"cannot read checkpoint {path}: it is torn or no checkpoint of torch.save (a tensor storage "
                       "its pickle names is missing or of another size)")
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
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
