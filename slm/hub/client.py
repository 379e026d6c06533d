"""Talking to the HuggingFace Hub: every call goes through one `HfApi` object (the test seam).

`Hub` wraps the calls slm makes with one error policy: a missing repo, file or branch becomes
`FileNotFoundError` (so Composer's autoresume falls through to "no checkpoint"); connection
errors, 408 and 5xx are retried with exponential backoff; anything else, or a transient error
that outlasts the retries, is a `HubError` with one line naming what failed. A 429 (rate limit)
is never a failure: it is waited out for as long as the Hub asks (`Retry-After`, or the "retry in
N minutes" of its message). Every call that makes a commit first takes a slot of a `CommitBudget`
(the Hub allows 128 commits an hour per repository). The token comes from `HF_TOKEN` (read by
`huggingface_hub` itself) and is masked in every message.
"""

from __future__ import annotations

import importlib
import logging
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import requests
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from slm.core.credentials import file_holds_secret, known_secrets, masked, secret_place
from slm.core.errors import Refused, SlmError
from slm.core.foreign import checked_folder, plain_name

log = logging.getLogger(__name__)
TRANSIENT_STATUS = {408, 500, 502, 503, 504}
RATE_LIMITED = 429
MAX_RATE_LIMIT_WAIT = 3600.0  # seconds; a Retry-After beyond the Hub's own window is not believed
HF_URI = "hf://"


class HubError(SlmError):
    """A Hub call failed for good."""


def _status(e: Exception) -> int | None:
    """Return the HTTP status of an error's response, or None where it has none."""
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _network_errors() -> tuple[type[Exception], ...]:
    """Return the connection and timeout errors of the HTTP library huggingface_hub talks through: requests before 1.0,
    httpx in 1.x, httpx2 in 2.x. The httpx ones are no OSErrors."""
    errors: list[type[Exception]] = [requests.ConnectionError, requests.Timeout]
    for name in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except ImportError:
            pass
    return tuple(errors)


NETWORK_ERRORS = _network_errors()


def _is_transient(e: Exception) -> bool:
    """Return whether an error is worth retrying: a connection error or timeout, a 408 or a 5xx; never when offline."""
    if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return False  # HF_HUB_OFFLINE is set: waiting will not help
    if isinstance(e, NETWORK_ERRORS):
        return True
    return isinstance(e, HfHubHTTPError) and _status(e) in TRANSIENT_STATUS


def rate_limit_wait(e: Exception, fallback: float) -> float | None:
    """Return the seconds a 429 asks to wait (Retry-After, else the message's "retry ... in N minutes"); None if not a
    429."""
    if _status(e) != RATE_LIMITED:
        return None
    header = e.response.headers.get("Retry-After") if e.response is not None else None
    wait = None
    if header:
        try:
            wait = float(header)
        except ValueError:
            try:
                wait = parsedate_to_datetime(header).timestamp() - time.time()
            except (TypeError, ValueError):
                wait = None
    if wait is None:
        match = re.search(r"retry this action in (\d+) (second|minute|hour)", str(e))
        if match:
            wait = int(match.group(1)) * {"second": 1, "minute": 60, "hour": 3600}[match.group(2)]
    return min(max(wait if wait is not None else fallback, 1.0), MAX_RATE_LIMIT_WAIT)


def _first_line(e: Exception) -> str:
    """Return the first line of an error's message (else its type's name), every known secret masked."""
    return masked(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def parse_hf_uri(uri: str) -> tuple[str, str, str]:
    """Parse hf://datasets/ORG/NAME/PATH (or hf://ORG/NAME/PATH for a model) -> (repo_type, repo_id, path)."""
    parts = uri.removeprefix(HF_URI).strip("/").split("/")
    repo_type = "model"
    if parts and parts[0] in ("datasets", "models", "spaces"):
        repo_type = parts.pop(0).removesuffix("s")
    if not uri.startswith(HF_URI) or len(parts) < 2 or not all(parts[:2]):
        raise SlmError(f"'{uri}' is not a Hub location: use hf://datasets/ORG/NAME[/PATH]")
    return repo_type, "/".join(parts[:2]), "/".join(parts[2:])


def refuse_uploading_secrets(files: dict[str, Path | bytes], repo_id: str) -> None:
    """Refuse an upload any of whose files or contents holds a known secret (slm/core/credentials.py): checked here, at
    the one way out to the Hub, for every byte slm uploads, not only the files it renders."""
    secrets = known_secrets()
    for name, data in files.items():
        held = secret_place(data, secrets) is not None if isinstance(data, bytes) else file_holds_secret(data, secrets)
        if held:
            raise Refused(f"the upload to the Hub repo {repo_id}: {name} holds a secret (the value of a token, key or "
                          "password this process can see); slm never uploads one (docs/security.md)")


class CommitBudget:
    """At most `max_commits` commits per repository in any `window` seconds (a sliding window, this process's)."""

    def __init__(self, max_commits: int = 100, window: float = 3600.0):
        self.max_commits, self.window = max_commits, window
        self._times: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def wait_for_slot(self, repo_id: str) -> None:
        """Block until a commit to `repo_id` fits in the budget, saying so once when it has to wait."""
        said = False
        while True:
            with self._lock:
                times = self._times.setdefault(repo_id, deque())
                now = time.monotonic()
                while times and times[0] <= now - self.window:
                    times.popleft()
                if len(times) < self.max_commits:
                    return
                wait = times[0] + self.window - now + 0.01
            if not said:
                log.warning("commit budget of %d per %.0f s for %s reached: next commit in %.1f s (pending "
                            "checkpoints wait and go up together)", self.max_commits, self.window, repo_id, wait)
                said = True
            time.sleep(wait)

    def spend(self, repo_id: str) -> None:
        """Record a commit to `repo_id` made just now, in its window."""
        with self._lock:
            self._times.setdefault(repo_id, deque()).append(time.monotonic())


class Hub:
    """The Hub calls slm makes, each retried on transient errors; commits within a budget."""

    def __init__(self, retries: int = 5, retry_wait: float = 2.0, api: HfApi | None = None,
                 budget: CommitBudget | None = None):
        self.retries, self.retry_wait = retries, retry_wait
        self.api = api or HfApi()
        self.budget = budget or CommitBudget()
        self._created: set[tuple[str, str]] = set()

    def call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """Call `fn(**kwargs)` by the module's error policy (`what` names the call in errors): missing is
        FileNotFoundError, a 429 is waited out, a transient error retried with backoff, anything else a HubError."""
        attempt, rate_limited = 1, 0
        while True:
            try:
                return fn(**kwargs)
            except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
                if isinstance(e, LocalEntryNotFoundError):
                    raise HubError(f"{what} failed: the Hub is unreachable (HF_HUB_OFFLINE is set?)") from e
                raise FileNotFoundError(f"{what}: not found on the Hub ({_first_line(e)})") from e
            except (OSError, ValueError, *NETWORK_ERRORS) as e:  # HfHubHTTPError is an OSError
                wait = rate_limit_wait(e, fallback=min(self.retry_wait * 2**rate_limited, MAX_RATE_LIMIT_WAIT))
                if wait is not None:  # the Hub's rate limit: wait as asked, however often
                    rate_limited += 1
                    log.warning("%s: the Hub's rate limit (429): waiting %.0f s as it asks, then retrying", what,
                                wait)
                    time.sleep(wait)
                    continue
                if not _is_transient(e):
                    raise HubError(f"{what} failed: {_first_line(e)}") from e
                if attempt == self.retries:
                    raise HubError(f"{what} failed after {attempt} attempts: {_first_line(e)}") from e
                wait = self.retry_wait * 2 ** (attempt - 1)
                attempt += 1
                log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", what, _first_line(e), wait,
                            attempt, self.retries)
                time.sleep(wait)

    def commit_call(self, what: str, repo: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """Run `call` for a call that makes one commit to `repo`: it waits for a slot of the budget first."""
        self.budget.wait_for_slot(repo)
        result = self.call(what, fn, **kwargs)
        self.budget.spend(repo)
        return result

    def ensure_repo(self, repo_id: str, repo_type: str = "model", private: bool = True) -> None:
        """Create the repo (private by default) unless it exists; once per process."""
        if (repo_id, repo_type) not in self._created:
            self.call(f"creating the Hub repo {repo_id}", self.api.create_repo, repo_id=repo_id,
                      repo_type=repo_type, private=private, exist_ok=True)
            self._created.add((repo_id, repo_type))

    def upload_file(self, path: Path, repo_id: str, path_in_repo: str, message: str,
                    repo_type: str = "model") -> None:
        refuse_uploading_secrets({path_in_repo: path}, repo_id)
        self.commit_call(f"upload of {path_in_repo} to the Hub repo {repo_id}", repo_id, self.api.upload_file,
                         path_or_fileobj=str(path), path_in_repo=path_in_repo, repo_id=repo_id, repo_type=repo_type,
                         commit_message=message)

    def commit(self, repo_id: str, files: dict[str, Path | bytes], message: str, repo_type: str = "model",
               revision: str | None = None) -> None:
        """Make one commit adding (or replacing) `files` (path in repo -> local file or content)."""
        refuse_uploading_secrets(files, repo_id)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(data) if isinstance(data, Path)
                                         else data) for name, data in files.items()]
        names = next(iter(files)) + (f" (and {len(files) - 1} more files)" if len(files) > 1 else "")
        self.commit_call(f"commit of {names} to the Hub repo {repo_id}", repo_id, self.api.create_commit,
                         repo_id=repo_id, operations=operations, commit_message=message, repo_type=repo_type,
                         revision=revision)

    def download_file(self, repo_id: str, path_in_repo: str, destination: Path, repo_type: str = "model",
                      revision: str | None = None) -> None:
        """Download one file to `destination` (complete or not at all); a name leading out of the repo is refused."""
        plain_name(path_in_repo, f"the download from the Hub repo {repo_id}", below=True)
        destination.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".download-") as tmp:
            got = self.call(f"download of {path_in_repo} from the Hub repo {repo_id}", self.api.hf_hub_download,
                            repo_id=repo_id, filename=path_in_repo, repo_type=repo_type, revision=revision,
                            local_dir=tmp)
            checked_folder(tmp, f"the download of {path_in_repo} from the Hub repo {repo_id}")
            shutil.move(got, destination)

    def read_file(self, repo_id: str, path_in_repo: str, revision: str | None = None) -> bytes:
        """Read the content of one (small) file of the repo."""
        with tempfile.TemporaryDirectory(prefix="slm-hub-") as tmp:
            destination = Path(tmp) / "file"
            self.download_file(repo_id, path_in_repo, destination, revision=revision)
            return destination.read_bytes()

    def download_revision(self, repo_id: str, revision: str, destination: Path, repo_type: str = "model") -> Path:
        """Download every file of one branch (or tag, or commit) of the repo, into `destination`."""
        destination.mkdir(parents=True, exist_ok=True)
        self.call(f"download of revision {revision} of the Hub repo {repo_id}", self.api.snapshot_download,
                  repo_id=repo_id, revision=revision, repo_type=repo_type, local_dir=str(destination))
        return checked_folder(destination, f"the download of {revision} of the Hub repo {repo_id}")

    def list_files(self, repo_id: str, repo_type: str = "model", revision: str | None = None) -> list[str]:
        """Return the path of every file of the repo at `revision` (None: main)."""
        return self.call(f"listing the Hub repo {repo_id}", self.api.list_repo_files, repo_id=repo_id,
                         repo_type=repo_type, revision=revision)

    def files_info(self, repo_id: str, paths: list[str], revision: str | None = None,
                   repo_type: str = "model") -> dict[str, Any]:
        """Return what the Hub holds at `paths` (a `RepoFile` each: size, git blob id, LFS sha256); absent paths left
        out."""
        infos = self.call(f"asking the Hub repo {repo_id} what it holds", self.api.get_paths_info, repo_id=repo_id,
                          paths=paths, revision=revision, repo_type=repo_type)
        return {info.path: info for info in infos if hasattr(info, "blob_id")}

    def tree(self, repo_id: str, revision: str | None = None, repo_type: str = "model") -> dict[str, Any]:
        """List every file of one revision of the repo, as `files_info` describes them."""
        def listing(**kwargs: Any) -> list:
            return list(self.api.list_repo_tree(**kwargs))  # the pages are fetched while iterating

        infos = self.call(f"listing the files of {revision or 'main'} of the Hub repo {repo_id}", listing,
                          repo_id=repo_id, recursive=True, revision=revision, repo_type=repo_type)
        return {info.path: info for info in infos if hasattr(info, "blob_id")}

    def branches(self, repo_id: str, repo_type: str = "model") -> set[str]:
        """Return the names of the repo's branches."""
        refs = self.call(f"listing the branches of the Hub repo {repo_id}", self.api.list_repo_refs,
                         repo_id=repo_id, repo_type=repo_type)
        return {branch.name for branch in refs.branches}

    def push_folder(self, folder: Path, repo_id: str, message: str, *, repo_type: str = "model",
                    path_in_repo: str = "", branch: str | None = None, private: bool = True,
                    delete_patterns: list[str] | None = None) -> None:
        """Upload `folder` into the repo (created if missing), on `branch` (created from main) if given."""
        checked_folder(folder, "folder to upload")
        refuse_uploading_secrets({p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
                                  if p.is_file()}, repo_id)
        self.ensure_repo(repo_id, repo_type, private)
        if branch:
            self.call(f"creating branch {branch} of the Hub repo {repo_id}", self.api.create_branch,
                      repo_id=repo_id, branch=branch, repo_type=repo_type, exist_ok=True)
        self.commit_call(f"upload of {folder} to the Hub repo {repo_id}", repo_id, self.api.upload_folder,
                         folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                         path_in_repo=path_in_repo or None, revision=branch, commit_message=message,
                         delete_patterns=delete_patterns)

