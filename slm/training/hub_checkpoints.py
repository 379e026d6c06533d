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

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from slm.core.errors import say
from slm.core.run_folder import CHECKPOINT, LATEST, checkpoints, is_complete
from slm.hub.client import Hub, HubError
from slm.hub.manifest import LATEST_POINTER, branch_name, checked_remote_name, remote_name
from slm.training.upload_queue import PENDING, Uploader, UploadQueue, checkpoint_batch, keep_local_hint


class HubPublisher:
    """Rank 0's side of the Hub uploads, on the training thread: queue each checkpoint saved (and what the repo lacks
    at start), report the upload thread's error, wait for the queue to empty at the end."""

    def __init__(self, hub: Hub, repo: str, folder: Path, private: bool = True, export: bool = True,
                 run_name: str | None = None):
        self.hub, self.repo, self.folder, self.export = hub, repo, folder, export
        self.queue = UploadQueue(folder / PENDING)
        self.uploader = Uploader(hub, repo, folder, self.queue, private, run_name or folder.name)

    def add(self, path: Path) -> None:
        """Queue a checkpoint just saved (and its export, first: the checkpoint's manifest entry records it)."""
        self.raise_if_failed()
        if self.export:
            self.queue.stage_export(checkpoint_batch(path), path)
        self.queue.stage_checkpoint(path)
        self.uploader.wake()

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
            raise keep_local_hint(e, self.folder) from e
        on_hub = [checkpoint_batch(Path(name)) for name in remote if CHECKPOINT.match(Path(name).name)]
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
        self.queued = 0  # checkpoints queued while training
        self.training_seconds = 0.0  # what the training thread spent in this logger meanwhile (it never waits on an
        # upload: the run's last line says it, and tests/hub/test_hub.py holds it under one commit's time)

    @contextmanager
    def _on_the_training_thread(self) -> Iterator[None]:
        """Count the time inside as the training thread's, spent on the Hub while training."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.training_seconds += time.perf_counter() - start

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.publisher:
            files, exports = self.publisher.catch_up(int(state.timestamp.batch))
            if files or exports:
                say(f"{files} checkpoint(s) and {exports} export(s) of an earlier start are not on the Hub yet; "
                     "uploading them in the background")

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.publisher:
            with self._on_the_training_thread():
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
            if self.queued:
                say(f"training spent {self.training_seconds:.2f} s queueing {self.queued} checkpoint(s) for "
                    f"{self.repo}; their uploads ran beside it")

    def upload_file(self, state: State, remote_file_name: str, file_path: Path, *, overwrite: bool) -> None:
        """Queue the saver's checkpoint; its `latest` pointer file is not needed (each commit writes one)."""
        path = Path(file_path)
        if self.publisher and CHECKPOINT.match(path.name):
            with self._on_the_training_thread():
                self.publisher.add(path)
            self.queued += 1

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
