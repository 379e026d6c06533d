"""A folder-backed double of the `HfApi` calls slm makes: the one stand-in the tests allow.

The Hub is unreachable here, so this object answers at the `HfApi` boundary with the real
`huggingface_hub` exception types. Repos live in ROOT/{type}/{org}/{name}/{branch}/{path};
every call is appended to ROOT/calls.jsonl; ROOT/failures.json scripts errors, e.g.
`[{"method": "upload_file", "status": 503, "times": 2, "match": "ba4"}]` fails the next two
uploads whose arguments mention "ba4" with a 503 (status "connection": a dropped connection).
Subprocesses get it through `sitecustomize.py` beside this file when SLM_TEST_HUB_ROOT is set.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import requests
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError


def _error(cls: type, status: int, message: str) -> Exception:
    response = requests.Response()
    response.status_code = status
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
        if not failures_file.exists():
            return
        failures = json.loads(failures_file.read_text())
        for failure in failures:
            if failure["method"] == method and failure["times"] > 0 and failure.get("match", "") in json.dumps(args):
                failure["times"] -= 1
                failures_file.write_text(json.dumps(failures))
                if failure["status"] == "connection":
                    raise requests.ConnectionError("Connection aborted: RemoteDisconnected")
                message = failure.get("message", f"{failure['status']} Client Error for url: https://huggingface.co")
                raise _error(HfHubHTTPError, failure["status"], message)

    def repo_dir(self, repo_id: str, repo_type: str | None = None, revision: str | None = None) -> Path:
        return self.root / (repo_type or "model") / repo_id / (revision or "main")

    def _existing(self, repo_id: str, repo_type: str | None, revision: str | None = None) -> Path:
        path = self.repo_dir(repo_id, repo_type, revision)
        if not path.parent.is_dir():
            raise _error(RepositoryNotFoundError, 404, f"404 Client Error. Repository Not Found for url: {repo_id}")
        if not path.is_dir():
            raise _error(HfHubHTTPError, 404, f"404 Client Error. Revision Not Found: {revision}")
        return path

    # the HfApi calls ---------------------------------------------------------------------------
    def create_repo(self, repo_id: str, *, repo_type: str | None = None, private: bool = False,
                    exist_ok: bool = False, **kwargs) -> None:
        self._record("create_repo", {"repo_id": repo_id, "repo_type": repo_type, "private": private})
        main = self.repo_dir(repo_id, repo_type)
        if main.is_dir():
            if not exist_ok:
                raise _error(HfHubHTTPError, 409, "409 Conflict: repo exists")
            return
        main.mkdir(parents=True)
        (main.parent / "private").write_text(str(private))

    def upload_file(self, *, path_or_fileobj: str, path_in_repo: str, repo_id: str, repo_type: str | None = None,
                    revision: str | None = None, commit_message: str | None = None, **kwargs) -> None:
        self._record("upload_file", {"path_in_repo": path_in_repo, "repo_id": repo_id, "message": commit_message})
        target = self._existing(repo_id, repo_type, revision) / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path_or_fileobj, target)

    def upload_folder(self, *, folder_path: str, repo_id: str, repo_type: str | None = None,
                      path_in_repo: str | None = None, revision: str | None = None,
                      commit_message: str | None = None, delete_patterns: list[str] | None = None, **kwargs) -> None:
        self._record("upload_folder", {"folder_path": folder_path, "repo_id": repo_id, "revision": revision,
                                       "path_in_repo": path_in_repo})
        repo = self._existing(repo_id, repo_type, revision)
        for old in [p for p in repo.rglob("*") if p.is_file()]:
            if any(fnmatch.fnmatch(old.relative_to(repo).as_posix(), pat) for pat in delete_patterns or []):
                old.unlink()
        for folder in sorted((p for p in repo.rglob("*") if p.is_dir()), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()  # git has no empty folders
        shutil.copytree(folder_path, repo / (path_in_repo or ""), dirs_exist_ok=True)

    def create_branch(self, repo_id: str, *, branch: str, revision: str | None = None,
                      repo_type: str | None = None, exist_ok: bool = False, **kwargs) -> None:
        self._record("create_branch", {"repo_id": repo_id, "branch": branch})
        source = self._existing(repo_id, repo_type, revision)
        target = self.repo_dir(repo_id, repo_type, branch)
        if target.exists():
            if not exist_ok:
                raise _error(HfHubHTTPError, 409, f"409 Conflict: branch {branch} exists")
            return
        shutil.copytree(source, target)

    def list_repo_files(self, repo_id: str, *, repo_type: str | None = None, revision: str | None = None,
                        **kwargs) -> list[str]:
        self._record("list_repo_files", {"repo_id": repo_id})
        repo = self._existing(repo_id, repo_type, revision)
        return sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())

    def list_repo_refs(self, repo_id: str, *, repo_type: str | None = None, **kwargs) -> SimpleNamespace:
        self._record("list_repo_refs", {"repo_id": repo_id})
        repo = self._existing(repo_id, repo_type).parent
        return SimpleNamespace(branches=[SimpleNamespace(name=p.name) for p in sorted(repo.iterdir()) if p.is_dir()])

    def hf_hub_download(self, repo_id: str, filename: str, *, repo_type: str | None = None,
                        revision: str | None = None, local_dir: str | None = None, **kwargs) -> str:
        self._record("hf_hub_download", {"repo_id": repo_id, "filename": filename, "repo_type": repo_type})
        source = self._existing(repo_id, repo_type, revision) / filename
        if not source.is_file():
            raise _error(EntryNotFoundError, 404, f"404 Client Error. Entry Not Found for url: {repo_id}/{filename}")
        target = Path(local_dir or self.root / ".downloads") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return str(target)


def install(root: str | Path) -> FolderHfApi:
    """Point `huggingface_hub.HfApi` and `hf_hub_download` (used by Streaming for hf://) at the double."""
    import huggingface_hub

    api = FolderHfApi(root)
    huggingface_hub.HfApi = lambda *args, **kwargs: api
    huggingface_hub.hf_hub_download = api.hf_hub_download
    return api
