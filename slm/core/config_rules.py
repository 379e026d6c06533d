"""The config's value rules: each field of slm/core/config.py's schema that needs one names its rule with `ruled`,
and `slm.core.config.check` applies them after loading. A rule gets (dotted key, value, the dataclass holding it) and
returns the problem as one line, or None."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any

# A value rule: (dotted key, value, the dataclass holding it) -> the problem as one line, or None.
Rule = Callable[[str, Any, Any], "str | None"]
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
HUB_REPO = re.compile(r"[\w.-]+/[\w.-]+")


def ruled(default: Any = None, rule: Rule | None = None, *, factory: Callable[[], Any] | None = None) -> Any:
    """Make a dataclass field with a value rule that `check` applies."""
    kwargs = {"default_factory": factory} if factory else {"default": default}
    return field(metadata={"rule": rule} if rule else {}, **kwargs)


def positive(key: str, value: Any, owner: Any) -> str | None:
    """Check for a value above 0."""
    return None if value > 0 else f"config key '{key}' must be positive, got {value}"


def non_negative(key: str, value: Any, owner: Any) -> str | None:
    """Check for a value of 0 or more."""
    return None if value >= 0 else f"config key '{key}' must be 0 or more, got {value}"


def at_least_one(key: str, value: Any, owner: Any) -> str | None:
    """Check for a value of 1 or more."""
    return None if value >= 1 else f"config key '{key}' must be at least 1, got {value}"


# Composer's time string (`composer.core.Time.from_timestring`): a number, then a unit of `composer.core.TimeUnit`,
# the number whole but for `dur`. Matched here, not parsed by Composer: `import composer` takes seconds, and commands
# that read configs without training (`slm status`, `slm sweep`) start at once. tests/core/test_config.py holds this
# rule to Composer's answers.
TIME_UNITS = ("ep", "ba", "sp", "tok", "dur", "iter", "sec")
TIME = re.compile(rf"^(\d+(?:\.\d*)?(?:e[+-]?\d+)?)({'|'.join(TIME_UNITS)})$", re.IGNORECASE)


def a_time(key: str, value: Any, owner: Any) -> str | None:
    """Check a Composer time string: a number with a unit, e.g. 2000ba."""
    match = TIME.match(str(value))
    if match and (match.group(2).lower() == "dur" or float(match.group(1)).is_integer()):
        return None
    return (f"config key '{key}' = '{value}' is not a time: use a whole number with a unit, e.g. 2000ba (batches), "
            "10ep (epochs), 5000000tok (tokens)")


def a_location(key: str, value: Any, owner: Any) -> str | None:
    """Check a folder, file or remote a config names (maybe a saved config from elsewhere): unset, or text a path can
    be: no control character, no part longer than a file name may be (255 bytes), at most 4,096 characters."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 4096 or any(ord(c) < 32 for c in value) \
            or any(len(part.encode()) > 255 for part in value.split("/")):
        return (f"config key '{key}' = {str(value)[:60]!r}{'...' if len(str(value)) > 60 else ''} is no path: give "
                "a folder, file or remote (at most 255 bytes between slashes, no control characters)")
    return None


def shard_folder(key: str, value: Any, owner: Any) -> str | None:
    """Check a split's shard folder: set, and a location, unless the split has streams."""
    if value is not None or getattr(owner, "streams", None):  # a split of streams has no folder of its own
        return a_location(key, value, owner)
    return f"config key '{key}' is not set: give the folder of the MDS shards"


def stream_mixture(key: str, value: Any, owner: Any) -> str | None:
    """Check a split's `streams`: each with its folder; one kind of weight, as Streaming's `Stream` takes them."""
    if not value:
        return None
    split = key.rpartition(".")[0]
    if owner.local is not None or owner.remote is not None:
        return (f"config key '{key}' replaces {split}.local and {split}.remote: set them to null (yamls/base.yaml "
                "sets local), or drop the streams")
    for name, stream in value.items():
        if stream.local is None:
            return (f"config key '{key}.{name}.local' is not set: give the folder of the stream's MDS shards "
                    "(with a remote, its local cache)")
        if stream.proportion is not None and stream.repeat is not None:
            return f"config key '{key}.{name}' sets both proportion and repeat: give one"
        for weight in ("proportion", "repeat"):
            if getattr(stream, weight) is not None and getattr(stream, weight) <= 0:
                return f"config key '{key}.{name}.{weight}' must be positive, got {getattr(stream, weight)}"
    folders: dict[str, str] = {}  # Streaming refuses two streams in one folder
    for name, stream in value.items():
        other = folders.setdefault(str(Path(stream.local).resolve()), name)
        if other != name:
            return f"config keys '{key}.{other}.local' and '{key}.{name}.local' name one folder: give each its own"
    with_proportion = [name for name, stream in value.items() if stream.proportion is not None]
    if with_proportion and len(with_proportion) < len(value):
        other = next(name for name in value if name not in with_proportion)
        return (f"config key '{key}.{other}' has no proportion but '{key}.{with_proportion[0]}' has one: give "
                "every stream a proportion, or none (repeat, or each sample once an epoch)")
    return None


def safe_run_name(key: str, value: Any, owner: Any) -> str | None:
    """Check that a run_name is a plain folder name."""
    if RUN_NAME.match(value) and ".." not in value:
        return None
    return f"run_name '{value}' is not a safe folder name: use letters, digits and . _ + - (no '/' or '..')"


def microbatch(key: str, value: Any, owner: Any) -> str | None:
    """Check for a positive integer, 'auto' or nothing."""
    if value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return None
    return f"config key '{key}' must be a positive integer or 'auto', got {value!r}"


def keep_count(key: str, value: Any, owner: Any) -> str | None:
    """Check for -1 (keep all) or a positive count."""
    if value == -1 or value > 0:
        return None
    return f"config key '{key}' must be -1 (keep all) or a positive number, got {value}"


def model_class(key: str, value: Any, owner: Any) -> str | None:
    """Check that a model names its class or a pretrained model."""
    if "class" in value or value.get("pretrained"):
        return None
    return (f"config key '{key}.class' is not set: use a causal LM's model_type (llama, mamba, gpt2, ...) or "
            f"class name, or {key}.pretrained (a folder or Hub id)")


def hub_repo(key: str, value: Any, owner: Any) -> str | None:
    """Check for a Hub repo id ORG/NAME, or nothing."""
    if value is None or HUB_REPO.fullmatch(value):
        return None
    return f"config key '{key}' = '{value}' is not a Hub repo id: use ORG/NAME"


def one_of(*choices: str) -> Rule:
    """Return a rule accepting only `choices`."""
    def rule(key: str, value: Any, owner: Any) -> str | None:
        return None if value in choices else f"config key '{key}' = '{value}' is not one of {', '.join(choices)}"
    return rule


def optional_time(key: str, value: Any, owner: Any) -> str | None:
    """Check for a Composer time string, or nothing."""
    return None if value is None else a_time(key, value, owner)


def a_length(key: str, value: Any, owner: Any) -> str | None:
    """Check for a fraction of max_duration in (0, 1], or a time."""
    try:
        return None if 0 < float(value) <= 1 else f"config key '{key}' = {value}: a fraction must be in (0, 1]"
    except ValueError:
        return a_time(key, value, owner)
