"""The one secret rule (slm/core/credentials.py; docs/security.md, "Secrets"), held to a table of the names real tokens,
keys and passwords go by, and to what slm writes, uploads and shows."""

from __future__ import annotations

import pytest

from slm.core.credentials import file_holds_secret, is_secret_name, known_secrets, masked
from slm.core.errors import Refused, SlmError, describe_error
from slm.core.paths import refuse_secrets

SECRET_NAMES = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "PGPASSWORD", "AWS_SECRET_ACCESS_KEY",
                "GITHUB_TOKEN", "OPENAI_API_KEY", "DB_PASSWORD", "MYSQL_PASSWD", "CLIENT_SECRET", "hf_token"]
NOT_SECRETS = ["HF_TOKEN_PATH", "TOKENIZERS_PARALLELISM", "KEYBOARD_LAYOUT", "PASSWORD_STORE_DIR", "SECRETS_DIR",
               "PWD", "HOME"]
VALUE = "a-value-of-twenty-chars"


@pytest.fixture
def clean(monkeypatch, tmp_path):
    """No secret of this machine's: no token variables, an empty home, no Hub login, no netrc."""
    import huggingface_hub.constants

    for name in [n for n in __import__("os").environ if is_secret_name(n)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-stored"))
    return tmp_path


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_a_variable_named_as_a_secret_holds_one(clean, monkeypatch, name):
    monkeypatch.setenv(name, VALUE)
    assert is_secret_name(name) and known_secrets() == [VALUE]
    assert masked(f"x {VALUE} y") == "x *** y"
    with pytest.raises(Refused, match=r"the config: 'hub.repo' holds a secret"):
        refuse_secrets({"hub": {"repo": f"org/{VALUE}"}}, "the config")


@pytest.mark.parametrize("name", NOT_SECRETS)
def test_a_variable_only_mentioning_one_holds_none(clean, monkeypatch, name):
    monkeypatch.setenv(name, VALUE)
    assert not is_secret_name(name) and known_secrets() == []


def test_short_values_are_no_secrets(clean, monkeypatch):
    monkeypatch.setenv("SOME_KEY", "1234567")
    monkeypatch.setenv("OTHER_KEY", "12345678")
    assert known_secrets() == ["12345678"]


def test_the_hub_login_and_netrc_passwords_are_secrets(clean, monkeypatch):
    """The login's token file counts even where HUGGING_FACE_HUB_TOKEN (which the Hub would use first) is set; the
    netrc is the one $NETRC names, else ~/.netrc."""
    (clean / "hf-token").write_text("hf_LoginTokenOfTheFile0001\n")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_TheOlderVariableName02")
    (clean / ".netrc").write_text("machine api.wandb.ai login user password netrcInTheHome0003\n")
    (clean / "other-netrc").write_text("machine example.org login me password netrcNamedByNETRC04\n")
    assert set(known_secrets()) == {"hf_LoginTokenOfTheFile0001", "hf_TheOlderVariableName02",
                                    "netrcInTheHome0003"}
    monkeypatch.setenv("NETRC", str(clean / "other-netrc"))
    assert "netrcNamedByNETRC04" in known_secrets() and "netrcInTheHome0003" not in known_secrets()


def test_an_error_hides_a_secret_wherever_it_is_shown(clean, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", VALUE)
    error = SlmError(f"cannot read {VALUE}.yaml")
    assert str(error) == "cannot read ***.yaml" and describe_error(error) == "cannot read ***.yaml"
    assert describe_error(RuntimeError(f"bad {VALUE}")).startswith("RuntimeError: bad ***")


def test_every_upload_is_checked_for_secrets(clean, monkeypatch, tmp_path, fake_hub):
    """Not only the files slm renders: a file whose bytes hold a token (here a planted copy of it) is refused at the
    one way out to the Hub, for a commit, a single file and a folder; nothing reaches the repo."""
    from slm.hub.client import Hub

    monkeypatch.setenv("WANDB_API_KEY", VALUE)
    folder = tmp_path / "up"
    folder.mkdir()
    (folder / "clean.txt").write_text("nothing here")
    (folder / "run.json").write_bytes(b"\0\1binary " + VALUE.encode() + b" more")
    assert file_holds_secret(folder / "run.json") and not file_holds_secret(folder / "clean.txt")
    hub = Hub(retries=1, retry_wait=0)
    for upload in (lambda: hub.commit("me/repo", {"run.json": folder / "run.json"}, "m"),
                   lambda: hub.commit("me/repo", {"notes": f"key {VALUE}".encode()}, "m"),
                   lambda: hub.upload_file(folder / "run.json", "me/repo", "run.json", "m"),
                   lambda: hub.push_folder(folder, "me/repo", "m")):
        with pytest.raises(Refused, match="holds a secret .*slm never uploads one"):
            upload()
    assert fake_hub.commits() == []


def test_everything_a_command_prints_is_masked(clean, monkeypatch, capsys):
    """A report of someone's repo, a name read from elsewhere: whatever a command prints passes the one mask."""
    import sys

    from slm.core.errors import run_command

    monkeypatch.setenv("PGPASSWORD", VALUE)
    assert run_command("slm x", lambda: print(f"report {VALUE}") or print(f"said {VALUE}", file=sys.stderr)) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("report ***\n", "said ***\n")
