"""A folder-backed double of the `HfApi` calls slm makes: the one stand-in the tests allow.

The Hub is unreachable here, so this object answers at the `HfApi` boundary with the real
`huggingface_hub` exception types. Repos live in ROOT/{type}/{org}/{name}/{branch}/{path};
every call is appended to ROOT/calls.jsonl, every commit made to ROOT/commits.jsonl (with its
time). ROOT/failures.json scripts errors, e.g. `[{"method": "create_commit", "status": 503,
"times": 2, "match": "ba4"}]` fails the next two commits whose arguments mention "ba4" with a 503
(status "connection": a dropped connection; "retry_after": a Retry-After header).
ROOT/limits.json makes it as strict as the real Hub, scaled down: `{"max_commits": 3, "window":
10, "latency": 2}` answers a commit beyond 3 in any 10 s with the Hub's 429 and its Retry-After,
and makes every commit take 2 s. ROOT/corruptions.json makes it keep a torn copy of a file a commit
sends: `[{"match": "ep0-ba4-", "times": 1}]` halves the next file committed whose path holds "ep0-ba4-"
(`"revision": "ba2"`: only in a commit to that branch).
`get_paths_info` and `list_repo_tree` answer as the Hub does: `RepoFile`s with the size, the git
blob id, and for a file the repo's .gitattributes sends to LFS (or one over 10 MB) its LFS sha256.
Subprocesses get it through `sitecustomize.py` beside this file when SLM_TEST_HUB_ROOT is set.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import requests
from huggingface_hub import errors
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile, RepoFolder

# What the Hub raises for a missing file: EntryNotFoundError before huggingface-hub 1.0, RemoteEntryNotFoundError
# (an HfHubHTTPError and an EntryNotFoundError, which is no longer one) since.
EntryNotFoundError = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)

COMMITS = ("create_commit", "upload_file", "upload_folder")
# The first lines of the .gitattributes the Hub writes into a new model repo.
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in (
    "*.7z", "*.arrow", "*.bin", "*.ckpt", "*.gz", "*.h5", "*.msgpack", "*.npy", "*.onnx", "*.parquet", "*.pickle",
    "*.pkl", "*.pt", "*.pth", "*.safetensors", "*.tar", "*.zip", "*.zst", "*tfevents*"))
LFS_ABOVE = 10 * 1024 * 1024  # bytes: the Hub keeps a bigger file in LFS whatever .gitattributes says


def http_library():
    """The HTTP library the installed huggingface_hub talks through (requests before 1.0, httpx or httpx2 after):
    the double's errors are that library's, as the Hub's would be."""
    from huggingface_hub.utils import get_session

    return importlib.import_module(type(get_session()).__module__.split(".")[0])


def connection_error() -> Exception:
    library = http_library()
    if library is requests:
        return requests.ConnectionError("Connection aborted: RemoteDisconnected")
    return library.ConnectError("Connection aborted: RemoteDisconnected")


def hub_error(cls: type, status: int, message: str, retry_after: float | None = None) -> Exception:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    library = http_library()
    if library is requests:
        response = requests.Response()
        response.status_code = status
        response.headers.update(headers)
    else:
        response = library.Response(status, headers=headers, request=library.Request("POST", "https://huggingface.co"))
    return cls(message, response=response)


class FolderHfApi:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # bookkeeping -------------------------------------------------------------------------------
    def _record(self, method: str, kwargs: dict) -> None:
        args = {k: str(v) for k, v in kwargs.items()}
        with open(self.root / "calls.jsonl", "a") as f:
            f.write(json.dumps({"method": method, "args": args}) + "\n")
        failures_file = self.root / "failures.json"
        failures = json.loads(failures_file.read_text()) if failures_file.exists() else []
        for failure in failures:
            if failure["method"] == method and failure["times"] > 0 and failure.get("match", "") in json.dumps(args):
                failure["times"] -= 1
                failures_file.write_text(json.dumps(failures))
                if failure["status"] == "connection":
                    raise connection_error()
                message = failure.get("message", f"{failure['status']} Client Error for url: https://huggingface.co")
                raise hub_error(HfHubHTTPError, failure["status"], message, failure.get("retry_after"))
        if method in COMMITS:
            self._enforce_limits()

    def commits(self) -> list[dict]:
        path = self.root / "commits.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def _enforce_limits(self) -> None:
        """The Hub's commit rate limit, and its latency, as ROOT/limits.json scales them."""
        path = self.root / "limits.json"
        limits = json.loads(path.read_text()) if path.exists() else {}
        if "max_commits" in limits:
            now = time.time()
            recent = [c["time"] for c in self.commits() if c["time"] > now - limits["window"]]
            if len(recent) >= limits["max_commits"]:
                wait = math.ceil(min(recent) + limits["window"] - now)
                with open(self.root / "refused.jsonl", "a") as f:
                    f.write(json.dumps({"time": now, "retry_after": wait}) + "\n")
                raise hub_error(HfHubHTTPError, 429, f"429 Client Error: Too Many Requests. You have exceeded the rate "
                             f"limit for repository commits ({limits['max_commits']} per hour). You can retry this "
                             f"action in {wait} seconds.", retry_after=wait)
        time.sleep(limits.get("latency", 0))

    def _committed(self, repo_id: str, revision: str | None, paths: list[str]) -> None:
        self._corrupt(self.repo_dir(repo_id, None, revision), revision or "main", paths)
        with open(self.root / "commits.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "repo_id": repo_id, "revision": revision or "main",
                                "paths": paths}) + "\n")

    def _corrupt(self, repo: Path, revision: str, paths: list[str]) -> None:
        """Keep half of a file just committed, as ROOT/corruptions.json asks."""
        path = self.root / "corruptions.json"
        if not path.exists():
            return
        corruptions = json.loads(path.read_text())
        for corruption in corruptions:
            for name in paths:
                if (corruption["times"] > 0 and corruption["match"] in name and (repo / name).is_file()
                        and corruption.get("revision", revision) == revision):
                    corruption["times"] -= 1
                    data = (repo / name).read_bytes()
                    (repo / name).write_bytes(data[: len(data) // 2])
        path.write_text(json.dumps(corruptions))

    def _file_info(self, repo: Path, name: str) -> RepoFile:
        """A file as the Hub's API describes it."""
        data = (repo / name).read_bytes()
        attributes = (repo / ".gitattributes").read_text() if (repo / ".gitattributes").is_file() else ""
        patterns = [line.split()[0] for line in attributes.splitlines() if "filter=lfs" in line]
        base = name.rsplit("/", 1)[-1]
        if len(data) > LFS_ABOVE or any(fnmatch.fnmatch(base, pattern) for pattern in patterns):
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
            return RepoFile(path=name, size=len(data), oid=git_blob_id(pointer),
                            lfs={"size": len(data), "oid": sha256, "pointerSize": len(pointer)})
        return RepoFile(path=name, size=len(data), oid=git_blob_id(data))

    def repo_dir(self, repo_id: str, repo_type: str | None = None, revision: str | None = None) -> Path:
        return self.root / (repo_type or "model") / repo_id / (revision or "main")

    def _existing(self, repo_id: str, repo_type: str | None, revision: str | None = None) -> Path:
        path = self.repo_dir(repo_id, repo_type, revision)
        if not path.parent.is_dir():
            raise hub_error(RepositoryNotFoundError, 404, f"404 Client Error. Repository Not Found for url: {repo_id}")
        if not path.is_dir():
            raise hub_error(HfHubHTTPError, 404, f"404 Client Error. Revision Not Found: {revision}")
        return path

    # the HfApi calls ---------------------------------------------------------------------------
    def create_repo(self, repo_id: str, *, repo_type: str | None = None, private: bool = False,
                    exist_ok: bool = False, **kwargs) -> None:
        self._record("create_repo", {"repo_id": repo_id, "repo_type": repo_type, "private": private})
        main = self.repo_dir(repo_id, repo_type)
        if main.is_dir():
            if not exist_ok:
                raise hub_error(HfHubHTTPError, 409, "409 Conflict: repo exists")
            return
        main.mkdir(parents=True)
        (main / ".gitattributes").write_text(GITATTRIBUTES)  # the Hub's first commit
        (main.parent / "private").write_text(str(private))

    def upload_file(self, *, path_or_fileobj: str, path_in_repo: str, repo_id: str, repo_type: str | None = None,
                    revision: str | None = None, commit_message: str | None = None, **kwargs) -> None:
        self._record("upload_file", {"path_in_repo": path_in_repo, "repo_id": repo_id, "message": commit_message})
        target = self._existing(repo_id, repo_type, revision) / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path_or_fileobj, target)
        self._committed(repo_id, revision, [path_in_repo])

    def create_commit(self, repo_id: str, operations: list, *, commit_message: str, repo_type: str | None = None,
                      revision: str | None = None, **kwargs) -> None:
        paths = [op.path_in_repo for op in operations]
        self._record("create_commit", {"repo_id": repo_id, "revision": revision, "paths": paths,
                                       "message": commit_message})
        repo = self._existing(repo_id, repo_type, revision)
        for op in operations:
            target = repo / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            data = op.path_or_fileobj
            if isinstance(data, bytes):
                target.write_bytes(data)
            else:
                shutil.copyfile(data, target)
        self._committed(repo_id, revision, paths)

    def upload_folder(self, *, folder_path: str, repo_id: str, repo_type: str | None = None,
                      path_in_repo: str | None = None, revision: str | None = None,
                      commit_message: str | None = None, delete_patterns: list[str] | None = None, **kwargs) -> None:
        self._record("upload_folder", {"folder_path": folder_path, "repo_id": repo_id, "revision": revision,
                                       "path_in_repo": path_in_repo})
        repo = self._existing(repo_id, repo_type, revision)
        for old in [p for p in repo.rglob("*") if p.is_file()]:
            name = old.relative_to(repo).as_posix()
            if name != ".gitattributes" and any(fnmatch.fnmatch(name, pat) for pat in delete_patterns or []):
                old.unlink()
        for folder in sorted((p for p in repo.rglob("*") if p.is_dir()), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()  # git has no empty folders
        shutil.copytree(folder_path, repo / (path_in_repo or ""), dirs_exist_ok=True)
        self._committed(repo_id, revision, sorted(p.relative_to(folder_path).as_posix()
                                                  for p in Path(folder_path).rglob("*") if p.is_file()))

    def create_branch(self, repo_id: str, *, branch: str, revision: str | None = None,
                      repo_type: str | None = None, exist_ok: bool = False, **kwargs) -> None:
        self._record("create_branch", {"repo_id": repo_id, "branch": branch})
        source = self._existing(repo_id, repo_type, revision)
        target = self.repo_dir(repo_id, repo_type, branch)
        if target.exists():
            if not exist_ok:
                raise hub_error(HfHubHTTPError, 409, f"409 Conflict: branch {branch} exists")
            return
        shutil.copytree(source, target)

    def list_repo_files(self, repo_id: str, *, repo_type: str | None = None, revision: str | None = None,
                        **kwargs) -> list[str]:
        self._record("list_repo_files", {"repo_id": repo_id, "revision": revision})
        repo = self._existing(repo_id, repo_type, revision)
        return sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())

    def get_paths_info(self, repo_id: str, paths: list[str] | str, *, revision: str | None = None,
                       repo_type: str | None = None, **kwargs) -> list[RepoFile | RepoFolder]:
        self._record("get_paths_info", {"repo_id": repo_id, "revision": revision, "paths": paths})
        repo = self._existing(repo_id, repo_type, revision)
        wanted = [paths] if isinstance(paths, str) else paths
        return [self._file_info(repo, name) if (repo / name).is_file() else RepoFolder(path=name, oid="0" * 40)
                for name in wanted if (repo / name).exists()]

    def list_repo_tree(self, repo_id: str, path_in_repo: str | None = None, *, recursive: bool = False,
                       revision: str | None = None, repo_type: str | None = None, **kwargs):
        self._record("list_repo_tree", {"repo_id": repo_id, "revision": revision, "path_in_repo": path_in_repo})
        repo = self._existing(repo_id, repo_type, revision)
        top = repo / (path_in_repo or "")
        for path in sorted(top.rglob("*") if recursive else top.iterdir()):
            name = path.relative_to(repo).as_posix()
            yield self._file_info(repo, name) if path.is_file() else RepoFolder(path=name, oid="0" * 40)

    def list_repo_refs(self, repo_id: str, *, repo_type: str | None = None, **kwargs) -> SimpleNamespace:
        self._record("list_repo_refs", {"repo_id": repo_id})
        repo = self._existing(repo_id, repo_type).parent
        return SimpleNamespace(branches=[SimpleNamespace(name=p.name) for p in sorted(repo.iterdir()) if p.is_dir()])

    def hf_hub_download(self, repo_id: str, filename: str, *, repo_type: str | None = None,
                        revision: str | None = None, local_dir: str | None = None, **kwargs) -> str:
        self._record("hf_hub_download", {"repo_id": repo_id, "filename": filename, "repo_type": repo_type})
        source = self._existing(repo_id, repo_type, revision) / filename
        if not source.is_file():
            raise hub_error(EntryNotFoundError, 404, f"404 Client Error. Entry Not Found for url: {repo_id}/{filename}")
        target = Path(local_dir or self.root / ".downloads") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return str(target)

    def snapshot_download(self, repo_id: str, *, revision: str | None = None, repo_type: str | None = None,
                          local_dir: str | None = None, **kwargs) -> str:
        self._record("snapshot_download", {"repo_id": repo_id, "revision": revision, "repo_type": repo_type})
        source = self._existing(repo_id, repo_type, revision)
        target = Path(local_dir or self.root / ".downloads" / repo_id)
        shutil.copytree(source, target, dirs_exist_ok=True)
        return str(target)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def install(root: str | Path) -> FolderHfApi:
    """Point `huggingface_hub.HfApi` and `hf_hub_download` (used by Streaming for hf://) at the double."""
    import huggingface_hub

    api = FolderHfApi(root)

    class HfApi:
        """`HfApi(...)` gives the double; still a class, as transformers 5 writes `HfApi | None` at import."""

        def __new__(cls, *args, **kwargs) -> FolderHfApi:
            return api

    huggingface_hub.HfApi = HfApi
    huggingface_hub.hf_hub_download = api.hf_hub_download
    return api
