"""The Hub is unreachable here: a double at the HfApi boundary stands in for it."""

from pathlib import Path

import pytest

import slm.hub
from slm.cli import main


class FakeHfApi:
    """Records what would be sent to the Hub; `fail` makes every call raise like a refused request."""

    def __init__(self, fail: bool = False):
        self.repos: dict[str, dict] = {}
        self.uploads: list[tuple[str, str, dict[str, bytes]]] = []
        self.fail = fail

    def create_repo(self, repo_id, repo_type="model", private=False, exist_ok=False):
        if self.fail:
            raise OSError("401 Client Error: Unauthorized")
        self.repos[repo_id] = {"type": repo_type, "private": private}

    def upload_folder(self, folder_path, repo_id, repo_type="model", commit_message=""):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.uploads.append((repo_id, repo_type, files))


@pytest.mark.parametrize("local", [True, False])
def test_tokenizer_out_repo_pushes_the_saved_folder(monkeypatch, tmp_path, corpus, local):
    api = FakeHfApi()
    monkeypatch.setattr(slm.hub, "HfApi", lambda: api)
    out = ["--out-dir", str(tmp_path / "tok")] if local else []
    assert main(["tokenizer", "-i", str(corpus), "-f", "story", "-v", "300", "--out-repo", "me/tok", *out]) == 0
    assert api.repos == {"me/tok": {"type": "model", "private": True}}
    (repo, kind, files), = api.uploads
    assert repo == "me/tok" and kind == "model" and "tokenizer.json" in files
    if local:
        assert files["tokenizer.json"] == (tmp_path / "tok" / "tokenizer.json").read_bytes()


def test_refused_upload_is_one_clear_line(monkeypatch, tmp_path, corpus, capsys):
    monkeypatch.setattr(slm.hub, "HfApi", lambda: FakeHfApi(fail=True))
    code = main(["tokenizer", "-i", str(corpus), "-f", "story", "-v", "300", "--out-repo", "me/tok"])
    err = capsys.readouterr().err
    assert code == 1
    assert "slm tokenizer: error: upload of" in err and "me/tok failed: 401 Client Error" in err
