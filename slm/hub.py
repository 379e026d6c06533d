"""Talking to the HuggingFace Hub: every call goes through one `HfApi` object (the test seam)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

from slm.errors import SlmError


def push_folder(folder: Path, repo_id: str, repo_type: str = "model", message: str = "Upload with slm",
                api: HfApi | None = None) -> None:
    """Create `repo_id` (private) if missing and upload `folder` to it."""
    api = api or HfApi()
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=True, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type, commit_message=message)
    except (OSError, ValueError) as e:  # HfHubHTTPError and connection errors are OSErrors
        raise SlmError(f"upload of {folder} to the Hub repo {repo_id} failed: {str(e).splitlines()[0]}") from None
