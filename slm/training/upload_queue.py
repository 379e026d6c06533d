"""The queue of a run's checkpoints and exports waiting for the Hub (the `.hub-pending/` folder of its run folder)
and the thread that empties it into the model repo: a commit to `main` per round, one per export branch, each
checked against what the Hub then holds. Used by slm/training/hub_checkpoints.py, which the module docstring there
explains whole."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from slm.core.errors import say
from slm.core.foreign import read_bytes, read_json
from slm.core.paths import partial_file, write_atomically
from slm.core.run_folder import CHECKPOINT, METRICS
from slm.hub.client import Hub, HubError
from slm.hub.manifest import (
    LATEST_POINTER,
    MANIFEST,
    Manifest,
    branch_name,
    check_weights_record,
    checkpoint_entry,
    file_record,
    folder_records,
    matches,
    remote_name,
    weights_record,
)
from slm.training.export import export_checkpoint

PENDING = ".hub-pending"  # in the run folder: the upload queue (checkpoint hard links, export folders)
RUN_DATA = (METRICS, "run.json", "config.yaml")  # files of the run folder that go up with each checkpoint
PROGRESS_EVERY = 10.0  # seconds between "waiting for the Hub" lines at the end of a run
REPAIRS = 3  # uploads of a file the Hub keeps holding differently before the run stops


def checkpoint_batch(path: Path) -> int:
    """Return the batch of a checkpoint file, from its name."""
    return int(CHECKPOINT.match(path.name).group(2))


def keep_local_hint(e: HubError, folder: Path) -> HubError:
    """Return the Hub error with a hint: the checkpoints stay in `folder`, and a run with the same run_name resumes."""
    return HubError(f"{e}; the checkpoints stay in {folder}: fix the cause and run again with the same run_name "
                    "to resume (missing uploads are retried at start)")


class UploadQueue:
    """The `.hub-pending` folder of a run: checkpoints (hard links, each with its weights record) and export folders
    waiting for the Hub. Being a folder, it survives a kill."""

    def __init__(self, folder: Path):
        self.folder = folder

    def queued(self) -> tuple[dict[int, Path], dict[int, Path]]:
        """Return (checkpoints waiting for `main`, export folders waiting for their branch), by batch."""
        if not self.folder.is_dir():
            return {}, {}
        files = {checkpoint_batch(p): p for p in self.folder.iterdir() if CHECKPOINT.match(p.name)}
        exports = {int(p.name[2:]): p for p in self.folder.iterdir()
                   if p.is_dir() and p.name.startswith("ba") and p.name[2:].isdigit()}
        return files, exports

    def stage_checkpoint(self, path: Path) -> None:
        """Make a hard link of the checkpoint, and beside it (first) its weights record, here on the training
        thread: loading tensors from the upload thread upset torch's tensor bookkeeping."""
        self.folder.mkdir(exist_ok=True)
        export = self.folder / branch_name(checkpoint_batch(path))
        record = weights_record(path, export if export.is_dir() else None)
        write_atomically(self.record_file(path), json.dumps(record) + "\n")
        with partial_file(self.folder / path.name) as tmp:
            try:
                os.link(path, tmp)  # instant, and survives the original being pruned
            except OSError:
                shutil.copyfile(path, tmp)

    def record_file(self, queued: Path) -> Path:
        """Return where the weights record of a queued checkpoint is."""
        return self.folder / f"{queued.name}.json"

    def stage_export(self, batch: int, path: Path) -> None:
        """Write the HF export of the checkpoint at `path` into the queue, as the folder of its branch."""
        self.folder.mkdir(exist_ok=True)
        export_checkpoint(path, self.folder / branch_name(batch), overwrite=True)

    def remove_if_empty(self) -> None:
        """Remove the queue's folder once nothing waits in it."""
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


class Uploader:
    """The thread that empties an UploadQueue into the model repo: a commit to `main` per round (the checkpoints
    waiting, `latest`, the run's data and the manifest), a commit per export to its branch, each checked."""

    def __init__(self, hub: Hub, repo: str, folder: Path, queue: UploadQueue, private: bool, run_name: str):
        self.hub, self.repo, self.folder, self.queue, self.private = hub, repo, folder, queue, private
        self.run_name = run_name
        self.newest_uploaded = -1  # the batch `latest` points at in the repo
        self._manifest: Manifest | None = None  # read from the run folder (or the Hub) when first needed
        self._manifest_behind = False  # an export's record changed after the manifest went up
        self._exported: dict[int, dict] = {}  # records of exports that went up before their checkpoint
        self.error: HubError | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """Start the upload thread unless it runs (it stops when it finds the queue empty, under the same lock)."""
        with self._cond:
            if self._thread is None and self.error is None:
                self._thread = threading.Thread(target=self._work, name="hub-uploads", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        """Upload until nothing waits (the thread's body): the queued checkpoints first, then each export by batch, or
        the manifest where it is behind; an error is kept in `error` for the training thread."""
        try:
            while True:
                with self._cond:
                    files, exports = self.queue.queued()
                    if not files and not exports and not self._manifest_behind:
                        return
                if files:  # checkpoints first: they are what a resume needs
                    self._commit_checkpoints(files, exports)
                elif not exports:
                    self._commit_main({}, "the manifest, with the exports' records")
                else:
                    batch = min(exports)
                    self._commit_export(batch, exports[batch])
        except HubError as e:
            self.error = keep_local_hint(e, self.folder)
        except Exception as e:  # noqa: BLE001 - the training thread reports it
            self.error = HubError(f"uploading to the Hub repo {self.repo} failed: {type(e).__name__}: {e}")
        finally:
            with self._cond:
                self._thread = None
                self._cond.notify_all()

    def drain(self) -> None:
        """Run the thread until the queue is empty (or it fails), saying what is left every few seconds."""
        self.wake()
        last = -PROGRESS_EVERY  # the first line at once
        with self._cond:
            while self._thread is not None:
                files, exports = self.queue.queued()
                if (files or exports) and time.monotonic() - last >= PROGRESS_EVERY:
                    say(f"waiting for the Hub: {len(files)} checkpoint(s) and {len(exports)} export(s) to upload "
                         f"to {self.repo} (budget {self.hub.budget.max_commits} commits per "
                         f"{self.hub.budget.window:.0f} s)")
                    last = time.monotonic()
                self._cond.wait(timeout=1.0)

    def _run_data(self) -> dict[str, bytes]:
        """Return the run's data to commit: metrics.jsonl (to its last whole line), run.json, config.yaml, if there."""
        data = {}
        for name in RUN_DATA:
            try:
                content = read_bytes(self.folder / name, "run file", None)
            except FileNotFoundError:
                continue
            if name.endswith(".jsonl"):  # the training thread may be appending a line right now
                content = content[: content.rfind(b"\n") + 1]
            data[name] = content
        return data

    def _manifest_now(self) -> Manifest:
        """Return the manifest as uploaded so far: the run folder's copy, else the repo's (a run resumed elsewhere)."""
        if self._manifest is None:
            local = self.folder / MANIFEST
            try:
                text, where = read_bytes(local, "manifest"), str(local)
            except FileNotFoundError:
                try:
                    text, where = self.hub.read_file(self.repo, MANIFEST), f"{MANIFEST} of the Hub repo {self.repo}"
                except FileNotFoundError:
                    text = None
            try:
                self._manifest = Manifest.parse(text, where) if text else Manifest(self.run_name)
            except ValueError as e:
                raise HubError(f"{e}: move it away and run again (the manifest is rebuilt from what is uploaded "
                               "from then on)") from e
        return self._manifest

    def _commit_checkpoints(self, files: dict[int, Path], exports: dict[int, Path]) -> None:
        """Commit the queued checkpoints to main with their manifest entries (and `latest` if newer); unqueue them."""
        manifest = self._manifest_now()
        for batch, path in files.items():
            record = check_weights_record(read_json(self.queue.record_file(path), "queued upload's record"),
                                          str(self.queue.record_file(path)))
            entry = checkpoint_entry(path, record, exports.get(batch))
            old = manifest.entries.get(batch) or {}
            if entry["export"] is None and (self._exported.get(batch) or old.get("export")):
                entry["branch"], entry["export"] = branch_name(batch), self._exported.get(batch) or old["export"]
            manifest.entries[batch] = entry
        # newest first: an error names the commit by its first file, the checkpoint the run saved last
        contents: dict[str, Path | bytes] = {remote_name(p.name): p for _, p in sorted(files.items(), reverse=True)}
        newest = max(files)
        if newest > self.newest_uploaded:  # (a catch-up of older checkpoints leaves the pointer where it is)
            contents[LATEST_POINTER] = remote_name(files[newest].name).encode()
        self._commit_main(contents, ", ".join(p.name for _, p in sorted(files.items())) + " and the run's data")
        self.newest_uploaded = max(newest, self.newest_uploaded)
        for batch, path in files.items():
            self._exported.pop(batch, None)
            path.unlink(missing_ok=True)
            self.queue.record_file(path).unlink(missing_ok=True)

    def _commit_main(self, contents: dict[str, Path | bytes], message: str) -> None:
        """Make one commit to `main` of `contents`, the run's data and the manifest, checked."""
        manifest = self._manifest_now()
        contents = {**contents, **self._run_data(), MANIFEST: manifest.to_bytes()}
        self.hub.ensure_repo(self.repo, private=self.private)
        self.hub.commit(self.repo, contents, message)
        self._check_and_repair(contents, None, message)
        self._manifest_behind = False
        write_atomically(self.folder / MANIFEST, contents[MANIFEST].decode())

    def _commit_export(self, batch: int, folder: Path) -> None:
        """Push an export to its branch, checked; put its files' records in its manifest entry (or keep them until its
        checkpoint's entry exists); then remove it from the queue."""
        branch = branch_name(batch)
        self.hub.push_folder(folder, self.repo, f"HF export at batch {batch}", branch=branch,
                             private=self.private, delete_patterns=["*"])
        records = folder_records(folder)
        self._check_and_repair({name: folder / name for name in records}, branch, f"HF export at batch {batch}")
        entry = self._manifest_now().entries.get(batch)
        if entry is None:  # its checkpoint is still queued: its entry will take these records
            self._exported[batch] = records
        elif (entry["branch"], entry["export"]) != (branch, records):  # an export made again after a kill
            entry["branch"], entry["export"] = branch, records
            self._manifest_behind = True
        shutil.rmtree(folder)

    def _check_and_repair(self, sent: dict[str, Path | bytes], revision: str | None, message: str) -> None:
        """Ask the Hub what it holds at the paths just sent; send again what it lacks or holds differently."""
        records = {name: file_record(data) for name, data in sent.items()}
        where = f"{self.repo}@{revision or 'main'}"
        for attempt in range(REPAIRS + 1):
            held = self.hub.files_info(self.repo, list(records), revision=revision)
            wrong = [name for name, record in records.items() if name not in held or not matches(held[name], record)]
            if not wrong:
                return
            first = wrong[0]
            found = (f"a different {first} ({held[first].size:,} bytes, sent {records[first]['size']:,})"
                     if first in held else f"no {first}")
            others = f" (and {len(wrong) - 1} more files)" if len(wrong) > 1 else ""
            if attempt == REPAIRS:
                raise HubError(f"the Hub repo {where} still holds {found}{others} after {REPAIRS} uploads again")
            say(f"the Hub repo {where} holds {found}{others} after the commit: uploading it again")
            self.hub.commit(self.repo, {name: sent[name] for name in wrong}, f"{message} (again: the Hub held a "
                            "different copy)", revision=revision)
