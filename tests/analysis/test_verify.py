"""What the Hub serves is what was trained: the manifest, the uploader's checks, and `slm verify`.

One real 8-batch run publishes to the Hub double (whose listings give sizes, git blob ids and LFS
sha256s as the Hub does), while the double keeps a torn copy of two files it is sent. Each fault
test then damages a copy of that repo the way published suites were found damaged and checks that
`slm verify` names exactly that fault.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from slm.cli import main
from slm.core.trust import unpickle_checkpoint
from slm.hub.manifest import MANIFEST, file_record, weights_digest

from helpers import hub_double, train, write_yaml

pytestmark = [pytest.mark.train, pytest.mark.beside]
REPO_ID = "me/published"
BATCHES = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def published(tmp_path_factory, shards):
    root = tmp_path_factory.mktemp("published")
    with pytest.MonkeyPatch.context() as monkeypatch:
        api = hub_double(root / "hub", monkeypatch)
        (api.root / "corruptions.json").write_text(json.dumps([
            {"match": "checkpoints/ep0-ba4-rank0.pt", "times": 1},
            {"match": "model.safetensors", "revision": "ba2", "times": 1}]))
        proc = train(write_yaml(root / "tiny.yaml", shards), "run_name=pub", f"hub.repo={REPO_ID}",
                     "max_duration=8ba")
    return SimpleNamespace(hub=api.root, run=root / "ckpt" / "pub", stderr=proc.stderr)


@pytest.fixture
def repo(published, tmp_path, monkeypatch) -> Path:
    """A copy of the published repo for one test to damage: the folder the double serves from."""
    api = hub_double(tmp_path / "hub", monkeypatch)
    shutil.copytree(published.hub, api.root, dirs_exist_ok=True)
    (api.root / "corruptions.json").unlink()
    return api.repo_dir(REPO_ID).parent  # its branches: main, ba1, ...


def verify(capsys, *args: str) -> tuple[int, dict]:
    code = main(["verify", REPO_ID, "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def faults(report: dict) -> set[tuple[str, int | None]]:
    return {(fault["kind"], fault["batch"]) for fault in report["faults"]}


def edit_manifest(repo: Path, edit) -> None:
    manifest = json.loads((repo / "main" / MANIFEST).read_text())
    edit({entry["batch"]: entry for entry in manifest["checkpoints"]})
    (repo / "main" / MANIFEST).write_text(json.dumps(manifest))


def test_the_manifest_records_each_checkpoint_and_export_as_the_run_folder_holds_them(published):
    repo = published.hub / "model" / REPO_ID
    manifest = json.loads((repo / "main" / MANIFEST).read_text())
    assert manifest == json.loads((published.run / MANIFEST).read_text())  # the run folder's copy
    assert manifest["run_name"] == "pub" and [e["batch"] for e in manifest["checkpoints"]] == list(BATCHES)
    for entry in manifest["checkpoints"]:
        local = published.run / f"ep0-ba{entry['batch']}-rank0.pt"
        assert entry["checkpoint"] == {"path": f"checkpoints/{local.name}", **file_record(local)}
        assert (repo / "main" / entry["checkpoint"]["path"]).read_bytes() == local.read_bytes()
        state = unpickle_checkpoint(local)["state"]
        assert (entry["tokens"], entry["samples"]) == (entry["batch"] * 8 * 64, entry["batch"] * 8)
        assert entry["weights_sha256"] == weights_digest({k[6:]: v for k, v in state["model"].items()})
        branch = repo / entry["branch"]
        served = {p.relative_to(branch).as_posix(): file_record(p) for p in branch.rglob("*")
                  if p.is_file() and p.name != ".gitattributes"}
        assert entry["export"] == served and "model.safetensors" in served
        record = json.loads((branch / "slm-run.json").read_text())  # the branch's own record
        assert record["weights_sha256"] == entry["weights_sha256"]
        assert record["checkpoint_sha256"] == entry["checkpoint"]["sha256"]
        assert record["timestamp"]["batch"] == entry["batch"] and record["run_name"] == "pub"


def test_the_uploader_sends_again_a_file_the_hub_holds_differently(published):
    assert "the Hub repo me/published@main holds a different checkpoints/ep0-ba4-rank0.pt" in published.stderr
    assert "the Hub repo me/published@ba2 holds a different model.safetensors" in published.stderr
    commits = [json.loads(line) for line in (published.hub / "commits.jsonl").read_text().splitlines()]
    sent = [c for c in commits if "checkpoints/ep0-ba4-rank0.pt" in c["paths"]]
    assert len(sent) == 2 and sent[1]["paths"] == ["checkpoints/ep0-ba4-rank0.pt"]  # only what differed went again
    assert sum("model.safetensors" in c["paths"] for c in commits if c["revision"] == "ba2") == 2
    repo = published.hub / "model" / REPO_ID
    assert (repo / "ba2" / "model.safetensors").stat().st_size > 0
    assert (repo / "main" / "checkpoints" / "ep0-ba4-rank0.pt").read_bytes() == \
        (published.run / "ep0-ba4-rank0.pt").read_bytes()


def test_verify_passes_on_the_untouched_repo(repo, published, capsys):
    assert main(["verify", str(published.run)]) == 0  # a run folder: its hub.repo, against its checkpoints
    text = capsys.readouterr().out
    assert "me/published @ main: manifest of run pub, 4 checkpoint(s)" in text
    assert "me/published: every checkpoint and export is what was uploaded" in text
    code, report = verify(capsys, "--run", str(published.run), "--deep")
    assert code == 0 and report["faults"] == [] and report["ok"]
    assert [(r["batch"], r["tokens"], r["checkpoint"], r["branch"]) for r in report["rows"]] == [
        (b, b * 512, "ok", "ok") for b in BATCHES]


def swap_weights(repo: Path) -> None:
    a, b = repo / "ba2" / "model.safetensors", repo / "ba8" / "model.safetensors"
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)


def final_weights_everywhere(repo: Path) -> None:
    for batch in (1, 2, 4):
        shutil.copyfile(repo / "ba8" / "model.safetensors", repo / f"ba{batch}" / "model.safetensors")


def truncate_checkpoint(repo: Path) -> None:
    path = repo / "main" / "checkpoints" / "ep0-ba4-rank0.pt"
    path.write_bytes(path.read_bytes()[:1000])


def replace_config(repo: Path) -> None:
    path = repo / "ba2" / "config.json"
    path.write_text(path.read_text().replace('"hidden_act"', '"hidden_act_"'))


def delete_branch(repo: Path) -> None:
    shutil.rmtree(repo / "ba4")


def drop_entry(repo: Path) -> None:
    manifest = json.loads((repo / "main" / MANIFEST).read_text())
    manifest["checkpoints"] = [e for e in manifest["checkpoints"] if e["batch"] != 2]
    (repo / "main" / MANIFEST).write_text(json.dumps(manifest))


def stale_latest(repo: Path) -> None:
    (repo / "main" / "checkpoints" / "latest-rank0.pt.symlink").write_text("checkpoints/ep0-ba4-rank0.pt")


def delete_checkpoint(repo: Path) -> None:
    (repo / "main" / "checkpoints" / "ep0-ba2-rank0.pt").unlink()


@pytest.mark.parametrize(("damage", "expected"), [
    (swap_weights, {("wrong_weights", 2), ("wrong_weights", 8)}),  # pythia #205
    (final_weights_everywhere, {("wrong_weights", 1), ("wrong_weights", 2), ("wrong_weights", 4),
                                ("duplicate_weights", None)}),  # pythia #195
    (truncate_checkpoint, {("hash_mismatch", 4), ("differs_from_local", 4)}),  # pythia #206
    (replace_config, {("hash_mismatch", 2)}),
    (delete_branch, {("missing_branch", 4)}),  # pythia #202
    (drop_entry, {("unlisted_branch", 2)}),
    (stale_latest, {("stale_latest", None)}),
    (delete_checkpoint, {("missing_file", 2), ("missing_on_hub", 2)}),
], ids=lambda v: v.__name__ if callable(v) else "")
def test_verify_names_each_fault_injected_into_the_repo(repo, published, capsys, damage, expected):
    damage(repo)
    code, report = verify(capsys, "--run", str(published.run))
    assert code == 1 and faults(report) == expected, report["faults"]
    assert main(["verify", REPO_ID, "--run", str(published.run)]) == 1
    text = capsys.readouterr().out
    assert f"faults ({len(report['faults'])}):" in text and "me/published: " in text
    if damage is final_weights_everywhere:
        assert "duplicate_weights: branches ba1, ba2, ba4, ba8 serve identical weights" in text
        assert "wrong_weights: branch ba1 serves the weights of batch 8 (model.safetensors)" in text


def test_deep_verify_finds_an_export_whose_weights_are_not_its_checkpoints(repo, capsys):
    """An export made from other weights than its checkpoint's, its manifest record made from that export:
    every hash agrees, only recomputing the weights tells."""
    from safetensors.torch import load_file, save_file

    path = repo / "ba4" / "model.safetensors"
    weights = load_file(path)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, path, metadata={"format": "pt"})
    edit_manifest(repo, lambda entries: entries[4]["export"].update({"model.safetensors": file_record(path)}))
    assert verify(capsys)[0] == 0
    code, report = verify(capsys, "--deep")
    assert code == 1 and faults(report) == {("export_mismatch", 4)}


def test_a_repo_without_a_manifest_is_checked_from_its_branches(repo, published, capsys):
    (repo / "main" / MANIFEST).unlink()
    code, report = verify(capsys, "--run", str(published.run))
    assert code == 0 and not report["manifest"]
    assert any("no slm-manifest.json on main" in line for line in report["not_checked"])
    assert [(r["batch"], r["checkpoint"], r["branch"]) for r in report["rows"]] == [
        (b, "unchecked", "unchecked") for b in BATCHES]
    final_weights_everywhere(repo)
    code, report = verify(capsys)
    assert code == 1 and faults(report) == {("duplicate_weights", None)}


def test_verify_of_something_that_is_no_repo_is_one_line(repo, tmp_path, capsys):
    assert main(["verify", "me/nothing"]) == 1
    assert capsys.readouterr().err.strip() == ("slm verify: error: me/nothing: no such Hub model repo or revision "
                                               "(or no read access: set HF_TOKEN)")
    assert main(["verify", str(tmp_path)]) == 1
    assert "is no run folder (no config.yaml)" in capsys.readouterr().err
