"""Checkpoints on the HuggingFace Hub during training, uploaded in the background within a commit budget.

Composer's `save_folder` only knows fixed URI schemes, so the Hub is reached through a
`LoggerDestination`: the CheckpointSaver hands it every checkpoint, and autoresume asks it for
the newest one when the local folder has none. On rank 0, each checkpoint is queued, not
uploaded: `HubPublisher`, on the training thread, hard-links it into the run folder's `.hub-pending/`
(`UploadQueue`; so pruning cannot take it away) and, with `hub.export`, writes its HF export there too
(`ba{B}/`). A background thread (`Uploader`) then makes one commit to `main` per round carrying every
pending checkpoint, the `latest` pointer and the run's data (`metrics.jsonl`, `run.json`, `config.yaml`),
and one commit per export on a branch `ba{B}`, so `AutoModelForCausalLM.from_pretrained(repo, revision="ba400")`
works. Training goes on meanwhile; when uploads fall behind, the checkpoints waiting go up
together. Every commit takes a slot of the Hub client's budget and a 429 is waited out.

Each commit to `main` also carries the manifest (slm/hub/manifest.py) with the new checkpoints' entries.
After every commit the Hub is asked what it now holds at the paths just sent; a file it lists
with another hash or size, or not at all, is sent again (within the budget), said in one line, and
a repo that still differs after a few tries stops the run: it never ends reporting success with a
repo that differs from its run folder.

The queue is the `.hub-pending/` folder, so a kill loses nothing: the next start uploads what is
there, and what the repo lacks of the local checkpoints. A finished or stopped run waits for the
queue to empty before it exits, saying so. A permanent Hub error stops the run at the next batch
with one line; the local checkpoints stay.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from slm.core.errors import say
from slm.core.foreign import read_bytes, read_json
from slm.core.paths import partial_file, write_atomically
from slm.core.run_folder import CHECKPOINT, LATEST, METRICS, checkpoints, is_complete
from slm.hub.client import Hub, HubError
from slm.hub.manifest import (
    LATEST_POINTER,
    MANIFEST,
    Manifest,
    branch_name,
    check_weights_record,
    checked_remote_name,
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


def _batch(path: Path) -> int:
    """Return the batch of a checkpoint file, from its name."""
    return int(CHECKPOINT.match(path.name).group(2))


def _keep_local_hint(e: HubError, folder: Path) -> HubError:
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
        files = {_batch(p): p for p in self.folder.iterdir() if CHECKPOINT.match(p.name)}
        exports = {int(p.name[2:]): p for p in self.folder.iterdir()
                   if p.is_dir() and p.name.startswith("ba") and p.name[2:].isdigit()}
        return files, exports

    def stage_checkpoint(self, path: Path) -> None:
        """Make a hard link of the checkpoint, and beside it (first) its weights record, here on the training
        thread: loading tensors from the upload thread upset torch's tensor bookkeeping."""
        self.folder.mkdir(exist_ok=True)
        export = self.folder / branch_name(_batch(path))
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
            self.error = _keep_local_hint(e, self.folder)
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


class HubPublisher:
    """Rank 0's side of the Hub uploads, on the training thread: queue each checkpoint saved (and what the repo lacks
    at start), report the upload thread's error, wait for the queue to empty at the end."""

    def __init__(self, hub: Hub, repo: str, folder: Path, private: bool = True, export: bool = True,
                 run_name: str | None = None):
        self.hub, self.repo, self.folder, self.export = hub, repo, folder, export
        self.queue = UploadQueue(folder / PENDING)
        self.uploader = Uploader(hub, repo, folder, self.queue, private, run_name or folder.name)
        self.added = 0  # checkpoints queued by `add` (while training)
        self.adding_seconds = 0.0  # what `add` took of the training thread: staging, and waking the upload thread

    def add(self, path: Path) -> None:
        """Queue a checkpoint just saved (and its export, first: the checkpoint's manifest entry records it); the
        time it takes the training thread is counted, as it never waits on an upload."""
        start = time.perf_counter()
        self.raise_if_failed()
        if self.export:
            self.queue.stage_export(_batch(path), path)
        self.queue.stage_checkpoint(path)
        self.uploader.wake()
        self.added += 1
        self.adding_seconds += time.perf_counter() - start

    def catch_up(self, up_to_batch: int) -> tuple[int, int]:
        """Queue the local complete checkpoints (up to `up_to_batch`) the repo lacks, or lacks as a branch.

        Returns how many checkpoints and exports are queued now (an earlier start's leftovers included).
        """
        local = {b: p for b, p in checkpoints(self.folder).items() if b <= up_to_batch and is_complete(p)}
        queued_files, queued_exports = self.queue.queued()
        if not local and not queued_files and not queued_exports:
            return 0, 0
        try:
            remote = set(self.hub.list_files(self.repo))
            branches = self.hub.branches(self.repo) if self.export else set()
        except FileNotFoundError:
            remote, branches = set(), set()
        except HubError as e:
            raise _keep_local_hint(e, self.folder) from e
        on_hub = [_batch(Path(name)) for name in remote if CHECKPOINT.match(Path(name).name)]
        self.uploader.newest_uploaded = max(on_hub, default=-1)
        for batch, path in sorted(local.items()):
            if self.export and branch_name(batch) not in branches and batch not in queued_exports:
                self.queue.stage_export(batch, path)
            if remote_name(path.name) not in remote and batch not in queued_files:
                self.queue.stage_checkpoint(path)
        for batch, queued in queued_files.items():  # a kill between an earlier start's record and its link
            if not self.queue.record_file(queued).exists():
                self.queue.stage_checkpoint(local.get(batch, queued))
        files, exports = self.queue.queued()
        if files or exports:
            self.uploader.wake()
        return len(files), len(exports)

    def raise_if_failed(self) -> None:
        """Raise the upload thread's error, if it stopped on one."""
        if self.uploader.error is not None:
            raise self.uploader.error

    def drain(self) -> None:
        """Wait until the queue is empty (saying what is left every few seconds), or raise the thread's error."""
        self.uploader.drain()
        self.raise_if_failed()
        self.queue.remove_if_empty()


class HubCheckpoints(LoggerDestination):
    """Every checkpoint of the run, the `latest` pointer and the run's data in the model repo `repo`."""

    def __init__(self, hub: Hub, repo: str, folder: Path, private: bool = True, export: bool = True,
                 run_name: str | None = None):
        self.hub, self.repo, self.folder = hub, repo, folder
        self.publisher = (HubPublisher(hub, repo, folder, private, export, run_name)
                          if dist.get_global_rank() == 0 else None)

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.publisher:
            files, exports = self.publisher.catch_up(int(state.timestamp.batch))
            if files or exports:
                say(f"{files} checkpoint(s) and {exports} export(s) of an earlier start are not on the Hub yet; "
                     "uploading them in the background")

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.publisher:
            self.publisher.raise_if_failed()

    def finish(self, state: State) -> None:
        """Upload what is queued or missing and wait for it: a finished or stopped run leaves only once all is up.

        Called by the trainer (slm/training/trainer.py, `train`) after `fit`, not at FIT_END: the other ranks go on
        to collectives (evaluation at FIT_END) that would time out while rank 0 waits here.
        """
        if self.publisher:
            self.publisher.drain()  # first, so that the listing catch_up makes is not racing the thread's commits
            self.publisher.catch_up(int(state.timestamp.batch))
            self.publisher.drain()
            if self.publisher.added:
                say(f"training spent {self.publisher.adding_seconds:.2f} s queueing {self.publisher.added} "
                    f"checkpoint(s) for {self.repo}; their uploads ran beside it")

    def upload_file(self, state: State, remote_file_name: str, file_path: Path, *, overwrite: bool) -> None:
        """Queue the saver's checkpoint; its `latest` pointer file is not needed (each commit writes one)."""
        path = Path(file_path)
        if self.publisher and CHECKPOINT.match(path.name):
            self.publisher.add(path)

    def can_upload_files(self) -> bool:
        return True

    def download_file(self, remote_file_name: str, destination: str, overwrite: bool = False,
                      progress_bar: bool = True) -> None:
        """Download what Composer's autoresume asks for: `latest` (never uploaded: not found), then the `latest`
        pointer, then the checkpoint whose name the pointer holds: that name, read from the repo, must be a
        checkpoint's."""
        if remote_file_name not in (remote_name(LATEST), LATEST_POINTER):
            checked_remote_name(remote_file_name, f"the Hub repo {self.repo}")
        self.hub.download_file(self.repo, remote_file_name, Path(destination))
        if remote_file_name == LATEST_POINTER:
            checked_remote_name(Path(destination).read_text(), f"the Hub repo {self.repo}'s {LATEST_POINTER}")
