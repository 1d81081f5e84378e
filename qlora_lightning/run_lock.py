"""One run per folder: `fit` locks the folders it writes, so two runs never write into each other's.

Two `fit` runs started at once in one `default_root_dir` used to take the same `lightning_logs/version_0`: their
`metrics.csv` mixed, and one run's clean-up of leftover temporaries deleted the other's and killed it. Two
`--ckpt_path last` resumes of one run wrote the same checkpoint folder, one final adapter over the other.

`RunLock` is a callback that, when `fit` starts (before anything is written there):
- locks the run's log folder (a CSV or TensorBoard logger's `version_<N>`) and the folder of every
  `ModelCheckpoint`, with an exclusive `fcntl.flock` on a hidden file beside each (`.<folder name>.lock`). The
  file says who holds it (process id, host, start time, command). The operating system releases a `flock` when
  its process ends, a SIGKILL included, so a lock never outlives its run; the file is removed at the end of `fit`.
- a new run whose automatically numbered version folder another live run holds moves on to the next free
  number and says so: runs started at once get distinct folders. Any other folder another run holds (a named
  `checkpoint.dirpath`, the folder of a run being resumed) is a `RunFolderError` naming that process.
- a folder that cannot be created or written is a `RunFolderError` naming it and its key, before the model
  loads, instead of a `PermissionError` after the training it could not save.

`QLoRAModule.configure_callbacks` adds one to every trainer (a plain `lightning.Trainer` too); the CLI puts it
before LightningCLI's config saver, so that `config.yaml` goes into the folder this run holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

__all__ = ["RunLock", "RunFolderError", "check_writable", "lock_path"]


class RunFolderError(RuntimeError):
    """A run folder cannot be used: another live run holds it, or it cannot be created or written."""


def _cannot_write(folder: Path, key: str, error: OSError) -> RunFolderError:
    return RunFolderError(
        f"cannot write {folder} ({key}): {error}. Nothing was trained; choose a folder this user can create "
        "and write, or fix its permissions"
    )


def check_writable(folder: str | os.PathLike, key: str) -> None:
    """Create `folder` if needed and write a temporary file in it, or raise `RunFolderError` naming it and `key`.

    A real write, not `os.access`: the superuser passes any permission check, not a path whose parent is a file
    or a read-only file system."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise _cannot_write(folder, key, e) from None


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of a run folder: hidden beside it (`.<name>.lock`), so that the folder itself holds only
    what the run writes (Lightning warns about a non-empty checkpoint or log folder)."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def _holder(fd: int) -> str:
    """Who holds the lock, as the holder wrote it into the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"process {info['pid']} on {info['host']} (since {info['since']}: {info['command']})"
    except (ValueError, KeyError, OSError):
        return "another process (it has not written its details yet)"


def _shortened(command: str, limit: int = 120) -> str:
    return command if len(command) <= limit else command[: limit - 1] + "…"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


class FolderInUse(RunFolderError):
    """Another live process holds the folder's run lock; `holder` says which."""

    def __init__(self, folder: Path, key: str, holder: str) -> None:
        super().__init__(
            f"{folder} ({key}) is in use by {holder}: two runs writing one folder overwrite each other's logs, "
            "checkpoints and adapters. Wait for that run to end (or stop it), or give this run another folder"
        )
        self.holder = holder


class _Lock:
    """A held run lock on `folder` (created if needed, and checked to be writable)."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.path = folder, lock_path(folder)
        check_writable(folder, key)
        try:
            self.fd = self._acquire(key)
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": _shortened(" ".join(sys.argv)),
            }
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(info).encode(), 0)
        except OSError as e:
            raise _cannot_write(self.path.parent, key, e) from None

    def _acquire(self, key: str) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise FolderInUse(self.folder, key, holder) from None
            if _same_file(fd, self.path):  # not removed by a run that ended while this one opened it
                return fd
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file (while still holding it, so that no other run takes a file about to vanish)."""
        with contextlib.suppress(OSError):
            if _same_file(self.fd, self.path):
                self.path.unlink()
        os.close(self.fd)  # closing the last descriptor releases the flock


def _numbered_version(logger: Any) -> bool:
    """Whether the logger numbers its version folders itself (`version_<N>`), so that a run may take another."""
    return isinstance(logger, (CSVLogger, TensorBoardLogger)) and isinstance(logger.version, int)


def _use_version(logger: CSVLogger | TensorBoardLogger, version: int | None) -> None:
    """Point a CSV or TensorBoard logger at another version folder (None: the next free number).

    Lightning resolves a logger's version before any callback runs (checked on Lightning 2.6.6:
    `Trainer.__setup_profiler` reads `log_dir`) and keeps it, and the writer opened for it, in `_version` and
    `_experiment`; the writer is reopened here, in the new folder, while that is still empty."""
    if version is not None and logger._version == version:
        return
    logger._version = version
    logger._experiment = None
    _ = logger.experiment


def _checkpoint_folder(trainer: Trainer, callback: ModelCheckpoint) -> Path:
    """The folder `callback` will write: its `dirpath`, or the one `ModelCheckpoint.setup` derives from the first
    logger (`<save_dir>/<name>/version_<N>/checkpoints`) or from `default_root_dir`."""
    if callback.dirpath is not None:
        return Path(callback.dirpath)
    if not trainer.loggers:
        return Path(trainer.default_root_dir) / "checkpoints"
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version / "checkpoints"


class RunLock(Callback):
    """Locks the folders a `fit` writes for as long as it runs (see the module docstring). No arguments: the
    folders are the trainer's log folder and its checkpoint callbacks' `dirpath`."""

    def __init__(self) -> None:
        self._held: list[_Lock] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        error, version = None, None
        if trainer.is_global_zero:
            try:
                version = self._lock_folders(trainer)
            except RunFolderError as e:
                error = str(e)
        error, version = trainer.strategy.broadcast((error, version))
        if error is not None:
            raise RunFolderError(error)
        if version is not None:  # every rank's logger: the checkpoint callbacks take their folder from it
            _use_version(trainer.loggers[0], version)

    def _lock_folders(self, trainer: Trainer) -> int | None:
        """Lock the log folder (moving on to a free version when its own is held), then the checkpoint folders;
        return the log version taken (None when the logger numbers none)."""
        logger = trainer.loggers[0] if trainer.loggers else None
        if isinstance(logger, (CSVLogger, TensorBoardLogger)):
            self._lock_log_folder(logger)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                self._lock(_checkpoint_folder(trainer, callback), "checkpoint.dirpath")
        return logger.version if _numbered_version(logger) else None

    def _lock(self, folder: Path, key: str) -> None:
        folder = folder.resolve()
        if all(folder != held.folder for held in self._held):
            self._held.append(_Lock(folder, key))

    def _lock_log_folder(self, logger: CSVLogger | TensorBoardLogger) -> None:
        while True:
            folder = Path(logger.log_dir)
            try:
                return self._lock(folder, "trainer.default_root_dir, the logger's version")
            except FolderInUse as e:
                if not _numbered_version(logger):
                    raise
                _use_version(logger, None)  # the next number past every version folder there is
                print(f"{folder} is in use by {e.holder}: this run logs to {logger.log_dir}", file=sys.stderr)

    def release(self) -> None:
        """Release every lock this run holds (at the end of `fit`, or when it fails)."""
        while self._held:
            self._held.pop().release()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.release()
