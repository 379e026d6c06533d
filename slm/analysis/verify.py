"""`slm verify`: whether a run's Hub repo serves what was trained.

The checks are the faults published suites have shipped: export branches holding another step's
weights, or the same weights under many steps; a file whose hash or size differs from what was
uploaded; a checkpoint without its branch or a branch without its checkpoint; a `latest` that is
not the newest; a local checkpoint the repo lacks. They compare what the Hub lists (sizes, LFS
sha256s, git blob ids: no download) with the manifest (slm/hub/manifest.py) and, with `--run`, with the
run folder's checkpoints. `--deep` downloads every checkpoint and export and recomputes the weights
digests. A repo written before slm kept a manifest is checked from its branches, and the report
says what could not be checked.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slm.core.errors import Refused, SlmError
from slm.core.run_folder import CHECKPOINT, checkpoints, is_complete
from slm.hub.client import Hub
from slm.hub.manifest import (
    BRANCH,
    LATEST_POINTER,
    MANIFEST,
    Manifest,
    branch_name,
    checkpoint_weights,
    file_record,
    matches,
    remote_name,
    remote_record,
    weights_digest,
)

WEIGHTS_FILES = (".safetensors", ".bin")  # the files of an export that hold its weights


@dataclass
class Fault:
    """One thing a Hub repo serves that differs from what was trained."""
    kind: str  # duplicate_weights, wrong_weights, hash_mismatch, missing_file, missing_branch, unlisted_branch,
    # missing_on_hub, differs_from_local, stale_latest, export_mismatch, checkpoint_mismatch, bad_manifest
    message: str
    batch: int | None = None


@dataclass
class Row:
    """One checkpoint: what main and its branch hold of it (ok, differs, missing, unchecked, none)."""

    batch: int
    tokens: int | None = None
    checkpoint: str = "missing"
    branch: str = "none"
    weights: str | None = None  # the weights digest (the manifest's, or recomputed with --deep)


@dataclass
class Report:
    """What `slm verify` found of a repo: a row per checkpoint, the faults, what it could not check."""
    repo: str
    revision: str
    run_name: str | None
    manifest: bool
    rows: list[Row] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the check found no fault."""
        return not self.faults

    def fault(self, kind: str, message: str, batch: int | None = None) -> None:
        """Record a fault of `kind`, of batch `batch` where it concerns one checkpoint."""
        self.faults.append(Fault(kind, message, batch))

    def to_json(self) -> str:
        """Return the report as indented JSON, with `ok` added."""
        return json.dumps({**asdict(self), "ok": self.ok}, indent=1)

    def to_text(self) -> str:
        """Return the report as `slm verify` prints it: a row per checkpoint, the faults, what was not checked."""
        lines = [f"{self.repo} @ {self.revision}: " + (f"manifest of run {self.run_name}, " if self.manifest
                                                        else "no manifest, ")
                 + f"{len(self.rows)} checkpoint(s)",
                 f"{'batch':>8} {'tokens':>12}  {'checkpoint':<10}  {'branch':<10}  weights"]
        lines += [f"{r.batch:>8} {r.tokens if r.tokens is not None else '?':>12}  {r.checkpoint:<10}  {r.branch:<10}  "
                  f"{(r.weights or '?')[:12]}" for r in self.rows]
        if self.faults:
            lines += [f"faults ({len(self.faults)}):"] + [f"  {f.kind}: {f.message}" for f in self.faults]
        if self.not_checked:
            lines += ["not checked:"] + [f"  {line}" for line in self.not_checked]
        lines.append(f"{self.repo}: {len(self.faults)} fault(s)" if self.faults else
                     f"{self.repo}: every checkpoint and export is what was uploaded")
        return "\n".join(lines)


def _describe(record: dict) -> str:
    """Return a file record as a fault shows it: its size and its sha256 (else its git blob id), shortened."""
    digest = record.get("sha256") or record.get("blob_id") or "?"
    return f"{record['size']:,} bytes, {'sha256' if 'sha256' in record else 'git blob'} {digest[:12]}"


class _Check:
    """The checks of one repo, filling a Report."""

    def __init__(self, repo: str, revision: str | None, hub: Hub):
        self.repo, self.hub = repo, hub
        try:
            self.main = hub.tree(repo, revision=revision)
        except FileNotFoundError:
            raise SlmError(f"{repo}{'@' + revision if revision else ''}: no such Hub model repo or revision (or "
                           "no read access: set HF_TOKEN)") from None
        self.revision = revision
        self.branches = {int(m.group(1)): hub.tree(repo, revision=name) for name in sorted(hub.branches(repo))
                         if (m := BRANCH.fullmatch(name))}
        manifest, problem = self._manifest()
        self.report = Report(repo, revision or "main", manifest.run_name if manifest else None, manifest is not None)
        if problem:
            self.report.fault("bad_manifest", problem)
        self.entries = manifest.entries if manifest else self._entries_from_main()
        if manifest is None:
            self.report.not_checked.append(f"no {MANIFEST} on main (written by slm since it verifies uploads): "
                                           "the files cannot be compared with what was uploaded, only with a run "
                                           "folder (--run) and with each other; tokens are read with --deep")

    def _manifest(self) -> tuple[Manifest | None, str | None]:
        """Return the manifest on main, or None and why it cannot be read."""
        if MANIFEST not in self.main:
            return None, None
        try:
            return Manifest.parse(self.hub.read_file(self.repo, MANIFEST, self.revision), f"{MANIFEST} on main"), None
        except ValueError as e:
            return None, str(e)

    def _entries_from_main(self) -> dict[int, dict]:
        """Return what a repo without a manifest says of its checkpoints: their files on main, a branch each if any."""
        found = {int(m.group(2)): path for path in self.main if (m := CHECKPOINT.match(path.rsplit("/", 1)[-1]))}
        return {batch: {"batch": batch, "checkpoint": {"path": path}, "export": None,
                        "branch": branch_name(batch) if self.branches else None} for batch, path in found.items()}

    def file(self, tree: dict, where: str, name: str, record: dict, batch: int) -> str:
        """Check one file the entry records: ok / differs / missing / unchecked; a fault unless ok."""
        if name not in tree:
            self.report.fault("missing_file", f"{name} is not on {where} (the manifest lists it)", batch)
            return "missing"
        if "size" not in record:
            return "unchecked"
        if matches(tree[name], record):
            return "ok"
        served = remote_record(tree[name])
        other = self._weights_of_another(name, served, batch) if name.endswith(WEIGHTS_FILES) else None
        if other is not None:
            self.report.fault("wrong_weights", f"branch {where} serves the weights of batch {other} ({name})", batch)
        else:
            self.report.fault("hash_mismatch", f"{name} on {where}: the Hub serves {_describe(served)}; the "
                              f"manifest says {_describe(record)}", batch)
        return "differs"

    def _weights_of_another(self, name: str, served: dict, batch: int) -> int | None:
        """Return the batch of another entry whose export file `name` has the sha256 the Hub serves, or None."""
        for other, entry in sorted(self.entries.items()):
            record = (entry.get("export") or {}).get(name)
            if other != batch and record and record.get("sha256") == served.get("sha256"):
                return other
        return None

    def rows(self) -> None:
        """Add a row per batch of the entries or the branches, checking its checkpoint on main and its export on its
        branch; a branch without an entry, or an entry without its branch, is a fault."""
        for batch in sorted(set(self.entries) | set(self.branches)):
            entry = self.entries.get(batch)
            row = Row(batch)
            self.report.rows.append(row)
            if entry is None:
                what = "an entry in the manifest" if self.report.manifest else "a checkpoint on main"
                self.report.fault("unlisted_branch", f"branch {branch_name(batch)} has no {what}", batch)
                row.branch = "unlisted"
                continue
            row.tokens, row.weights = entry.get("tokens"), entry.get("weights_sha256")
            checkpoint = entry["checkpoint"]
            row.checkpoint = self.file(self.main, "main", checkpoint["path"], checkpoint, batch)
            if entry.get("branch") is None:
                continue
            if batch not in self.branches:
                what = "the manifest lists it" if self.report.manifest else "main has its checkpoint"
                self.report.fault("missing_branch", f"branch {entry['branch']} is missing ({what})", batch)
                row.branch = "missing"
            elif entry.get("export"):
                states = [self.file(self.branches[batch], entry["branch"], name, record, batch)
                          for name, record in sorted(entry["export"].items())]
                row.branch = next((s for s in ("missing", "differs") if s in states), "ok")
            else:
                row.branch = "unchecked"

    def duplicates(self) -> None:
        """Report several batches with identical weights: branches serving the same weight files, or equal digests."""
        served = defaultdict(list)
        for batch, tree in self.branches.items():
            files = tuple(sorted((name, remote_record(info).get("sha256") or info.blob_id)
                                 for name, info in tree.items() if name.endswith(WEIGHTS_FILES)))
            if files:
                served[files].append(batch)
        digests = defaultdict(list)
        for row in self.report.rows:
            if row.weights:
                digests[row.weights].append(row.batch)
        for what, groups in (("branches {} serve", served), ("the checkpoints of batches {} hold", digests)):
            for batches in groups.values():
                if len(batches) > 1:
                    names = ", ".join(branch_name(b) if "branches" in what else str(b) for b in sorted(batches))
                    self.report.fault("duplicate_weights", what.format(names) + " identical weights")

    def latest(self) -> None:
        """Report a stale `latest` pointer: one that does not name the newest checkpoint on main."""
        found = {int(m.group(2)): path for path in self.main if (m := CHECKPOINT.match(path.rsplit("/", 1)[-1]))}
        if not found:
            return
        newest = found[max(found)]
        pointer = (self.hub.read_file(self.repo, LATEST_POINTER, self.revision).decode().strip()
                   if LATEST_POINTER in self.main else None)
        if pointer != newest:
            self.report.fault("stale_latest", f"{LATEST_POINTER} points at {pointer or 'nothing'}; the newest "
                              f"checkpoint on main is {newest}")

    def run_folder(self, run: Path) -> None:
        """Check each complete checkpoint of the run folder against main (a fault where it is missing or differs);
        refuse a folder with none."""
        local = {batch: path for batch, path in checkpoints(run).items() if is_complete(path)}
        if not local:
            raise SlmError(f"{run} holds no complete checkpoint (ep*-ba*-rank0.pt): give the run folder itself")
        for batch, path in sorted(local.items()):
            name = remote_name(path.name)
            if name not in self.main:
                self.report.fault("missing_on_hub", f"{path} is not on the Hub ({name})", batch)
            elif not matches(self.main[name], file_record(path)):
                self.report.fault("differs_from_local", f"{name} on main differs from {path}: the Hub serves "
                                  f"{_describe(remote_record(self.main[name]))}, the file is "
                                  f"{_describe(file_record(path))}", batch)

    def _read(self, path: Path, name: str, batch: int) -> dict | None:
        """Return the state of a downloaded checkpoint, or None and a fault: refused (its pickle names code) or torn."""
        from slm.training.export import read_checkpoint

        try:
            return read_checkpoint(path)
        except SlmError as e:
            kind = "refused_checkpoint" if isinstance(e, Refused) else "unreadable_checkpoint"
            self.report.fault(kind, str(e).replace(str(path), name), batch)
            return None

    def deep(self) -> None:
        """Download each checkpoint and export, recompute the weights digests, compare."""
        from slm.analysis.trained_models import load_export

        for i, row in enumerate(self.report.rows, 1):
            print(f"slm verify: downloading batch {row.batch} ({i} of {len(self.report.rows)})", file=sys.stderr,
                  flush=True)
            entry = self.entries.get(row.batch) or {}
            with tempfile.TemporaryDirectory(prefix="slm-verify-") as tmp:
                recorded, computed = row.weights, None
                if row.checkpoint not in ("missing",) and entry:
                    path = Path(tmp) / "checkpoint.pt"
                    self.hub.download_file(self.repo, entry["checkpoint"]["path"], path, revision=self.revision)
                    state = self._read(path, entry["checkpoint"]["path"], row.batch)
                    if state is not None:
                        computed = weights_digest(checkpoint_weights(state))
                        row.tokens = state["timestamp"]["Timestamp"]["token"]
                        if recorded and computed != recorded:
                            self.report.fault("checkpoint_mismatch", f"the weights of {entry['checkpoint']['path']} "
                                              f"differ from the manifest's digest", row.batch)
                        row.weights = computed
                if row.batch in self.branches:
                    folder = self.hub.download_revision(self.repo, branch_name(row.batch), Path(tmp) / "export")
                    exported = weights_digest(load_export(folder).model.state_dict())
                    reference = computed or recorded
                    if reference and exported != reference:
                        self.report.fault("export_mismatch", f"branch {branch_name(row.batch)} serves other weights "
                                          "than its checkpoint (from_pretrained's tensors differ)", row.batch)
                    row.weights = row.weights or exported


def verify(repo: str, revision: str | None = None, run: Path | None = None, deep: bool = False,
           hub: Hub | None = None) -> Report:
    """Check the Hub repo of a run; every fault found is in the report."""
    check = _Check(repo, revision, hub or Hub())
    check.rows()
    if deep:
        check.deep()
    elif check.report.manifest:
        check.report.not_checked.append("the exports' weights against their checkpoints' by the digests recorded at "
                                        "upload only (--deep downloads both and recomputes them)")
    check.duplicates()
    check.latest()
    if run is not None:
        check.run_folder(run)
    elif not check.report.manifest:
        check.report.not_checked.append("the checkpoints against a run folder (--run RUN_FOLDER)")
    return check.report
