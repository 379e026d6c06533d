"""Checkpoints on the HuggingFace Hub during training.

Composer's `save_folder` only knows fixed URI schemes, so the Hub is reached through a
`LoggerDestination`: the CheckpointSaver hands it every checkpoint and the
`latest-rank0.pt.symlink` text file, and autoresume asks it for them when the local folder has
none. With `hub.export`, `ExportToHub` also publishes each checkpoint in HF format on a branch
named after its batch, so `AutoModelForCausalLM.from_pretrained(repo, revision="ba400")` works.
Uploads happen before training goes on, so a checkpoint is never reported saved and then lost;
a run that starts uploads whatever an earlier, interrupted start could not.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import create_symlink_file, dist

from slm.checkpoints import LATEST, checkpoint_name, checkpoints, is_complete
from slm.export import export_checkpoint
from slm.hub import Hub, HubError

REMOTE_FOLDER = "checkpoints"


def remote_name(filename: str) -> str:
    return f"{REMOTE_FOLDER}/{filename}"


def branch_name(batch: int) -> str:
    return f"ba{batch}"


def _keep_local_hint(e: HubError, folder: Path) -> HubError:
    return HubError(f"{e}; the checkpoints stay in {folder}: fix the cause and run again with the same run_name "
                    "to resume (missing uploads are retried at start)")


class HubCheckpoints(LoggerDestination):
    """Every checkpoint of the run, and the `latest` pointer, in the model repo `repo`."""

    def __init__(self, hub: Hub, repo: str, folder: Path, private: bool = True):
        self.hub, self.repo, self.folder, self.private = hub, repo, folder, private

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            self.upload_missing()

    def upload_missing(self) -> None:
        """Upload local complete checkpoints the repo lacks (an earlier start failed or was killed mid-upload)."""
        local = [path for _, path in sorted(checkpoints(self.folder).items()) if is_complete(path)]
        if not local:
            return
        try:
            remote = set(self.hub.list_files(self.repo))
        except FileNotFoundError:
            remote = set()
        missing = [path for path in local if remote_name(path.name) not in remote]
        for path in missing:
            self._upload(path, remote_name(path.name), f"{path.name} (uploaded at restart)")
        if missing:
            with tempfile.TemporaryDirectory() as tmp:
                pointer = Path(tmp) / f"{LATEST}.symlink"
                create_symlink_file(remote_name(local[-1].name), pointer)
                self._upload(pointer, remote_name(pointer.name), f"latest -> {local[-1].name}")

    def _upload(self, path: Path, name: str, message: str) -> None:
        try:
            self.hub.ensure_repo(self.repo, private=self.private)
            self.hub.upload_file(path, self.repo, name, message)
        except HubError as e:
            raise _keep_local_hint(e, self.folder) from e

    def upload_file(self, state: State, remote_file_name: str, file_path: Path, *, overwrite: bool) -> None:
        self._upload(Path(file_path), remote_file_name, f"{state.run_name}: {remote_file_name} "
                                                        f"at batch {int(state.timestamp.batch)}")

    def can_upload_files(self) -> bool:
        return True

    def download_file(self, remote_file_name: str, destination: str, overwrite: bool = False,
                      progress_bar: bool = True) -> None:
        self.hub.download_file(self.repo, remote_file_name, Path(destination))


class ExportToHub(Callback):
    """After each checkpoint is saved (placed after the CheckpointSaver), its HF export on branch `ba{batch}`."""

    def __init__(self, hub: Hub, repo: str, folder: Path, saver: CheckpointSaver, private: bool = True):
        self.hub, self.repo, self.folder, self.saver, self.private = hub, repo, folder, saver, private
        self.exported: set[int] = set()

    def fit_start(self, state: State, logger: Logger) -> None:
        """Export local checkpoints an earlier start saved but did not get to export."""
        if dist.get_global_rank() != 0:
            return
        local = {b: p for b, p in checkpoints(self.folder).items() if b <= int(state.timestamp.batch)}
        if not local:
            return
        try:
            self.exported = {int(b[2:]) for b in self.hub.branches(self.repo) if b[2:].isdigit()}
        except FileNotFoundError:
            pass
        for batch, path in sorted(local.items()):
            if batch not in self.exported and is_complete(path):
                self.export(batch, path)

    def export(self, batch: int, path: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            out = export_checkpoint(path, Path(tmp) / "export")
            try:
                self.hub.push_folder(out, self.repo, f"HF export of {path.name}", branch=branch_name(batch),
                                     private=self.private, delete_patterns=[f"{REMOTE_FOLDER}/*"])
            except HubError as e:
                raise _keep_local_hint(e, self.folder) from e
        self.exported.add(batch)

    def _after_checkpoint(self, state: State) -> None:
        """Export what the saver wrote at this event, if anything (its own record, not a folder scan)."""
        batch = int(state.timestamp.batch)
        saved = self.saver.saved_checkpoints
        if dist.get_global_rank() == 0 and saved and batch not in self.exported \
                and Path(saved[-1]).name == checkpoint_name(int(state.timestamp.epoch), batch):
            self.export(batch, Path(saved[-1]))

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._after_checkpoint(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._after_checkpoint(state)
