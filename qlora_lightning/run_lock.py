"""One run per folder: `fit` locks the folders it writes, so two runs never write into each other's.

Two `fit` runs started at once in one `default_root_dir` used to take the same `lightning_logs/version_0`: their
`metrics.csv` mixed, and one run's clean-up of leftover temporaries deleted the other's and killed it. Two
`--ckpt_path last` resumes of one run wrote the same checkpoint folder, one final adapter over the other.

`RunLock` is a callback that, when `fit` starts (before anything is written there):
- locks the run's log folder (a CSV or TensorBoard logger's `version_<N>`) and the folder of every
  `ModelCheckpoint`, with an exclusive `fcntl.flock` on a hidden file beside each (`.<folder name>.lock`). The
  file says who holds it (process id, host, start time, command). The operating system releases a `flock` when
  its process ends, a SIGKILL included, so a lock never outlives its run; the file is removed at the end of `fit`.
- a new run's automatically numbered version folder is created by the run itself, atomically: of two runs that
  picked one number at the same moment, one creates it and the other moves on to the next number and says so.
  Any other folder another live run holds (a named version or `checkpoint.dirpath`, the folder of a run being
  resumed) is a `RunFolderError` naming that process.
- a folder that cannot be created or written is a `RunFolderError` naming it and its key, before the model
  loads, instead of a `PermissionError` after the training it could not save.

`QLoRAModule.configure_callbacks` adds one to every trainer (the command line's and a plain `lightning.Trainer`)
and has it take the log folder there, the first hook of a `fit`, before Lightning opens that folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, TypeGuard

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

from .atomic import check_writable

__all__ = ["RunLock", "RunFolderError", "check_run_folder", "lock_path"]


class RunFolderError(RuntimeError):
    """A run folder cannot be used: another live run holds it, or it cannot be created or written."""


def _cannot_write(folder: Path, key: str, error: OSError) -> RunFolderError:
    return RunFolderError(
        f"cannot write {folder} ({key}): {error}. Nothing was trained; choose a folder this user can create "
        "and write, or fix its permissions"
    )


def check_run_folder(folder: str | os.PathLike, key: str) -> None:
    """`atomic.check_writable`, or a `RunFolderError` naming `folder` and `key` (the setting that chose it)."""
    try:
        check_writable(folder)
    except OSError as e:
        raise _cannot_write(Path(folder), key, e) from None


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


def _in_use(folder: Path, key: str, holder: str) -> RunFolderError:
    return RunFolderError(
        f"{folder} ({key}) is in use by {holder}: two runs writing one folder overwrite each other's logs, "
        "checkpoints and adapters. Wait for that run to end (or stop it), or give this run another folder"
    )


class _Lock:
    """A held run lock on `folder` (created if needed, and checked to be writable)."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.path = folder, lock_path(folder)
        check_run_folder(folder, key)
        try:
            self.fd = self._acquire(key)
        except OSError as e:
            raise _cannot_write(self.path.parent, key, e) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": _shortened(" ".join(sys.argv)),
        }
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(info).encode(), 0)
        except OSError as e:
            self.release()
            raise _cannot_write(self.path.parent, key, e) from None

    def _acquire(self, key: str) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise _in_use(self.folder, key, holder) from None
            if _same_file(fd, self.path):  # not removed by a run that ended while this one opened it
                return fd
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file (while still holding it, so that no other run takes a file about to vanish)."""
        with contextlib.suppress(OSError):
            if _same_file(self.fd, self.path):
                self.path.unlink()
        os.close(self.fd)  # closing the last descriptor releases the flock


def _numbered_version(logger: Any) -> TypeGuard[CSVLogger | TensorBoardLogger]:
    """Whether the logger's version is a number (`version_<N>`): the one rank 0 took, given to every rank."""
    return isinstance(logger, (CSVLogger, TensorBoardLogger)) and isinstance(logger.version, int)


def _numbered_by_the_logger(logger: CSVLogger | TensorBoardLogger) -> bool:
    """Whether the logger is to pick its version number itself (none given, the default), and has not yet."""
    return logger._version is None


def _use_version(logger: CSVLogger | TensorBoardLogger, version: int | None) -> None:
    """Point a CSV or TensorBoard logger at another version folder (None: the next free number).

    A logger keeps its version, and the writer it opened for it, in `_version` and `_experiment` (checked on
    Lightning 2.6.6); a writer opened already is opened again, in the new folder, on next use."""
    if version is not None and logger._version == version:
        return
    logger._version = version
    logger._experiment = None


def _create_a_version_folder(logger: CSVLogger | TensorBoardLogger) -> None:
    """Create the logger's next `version_<N>` folder; when another run created that one first (both picked the
    number at the same moment), take the next."""
    while True:
        folder = Path(logger.log_dir)
        try:
            folder.mkdir(parents=True)  # atomic: of two runs creating one folder, one succeeds
            return
        except FileExistsError:
            _use_version(logger, None)  # the next number past every version folder there is
            print(
                f"{folder} was taken by a run started at the same moment: this run logs to {logger.log_dir}",
                file=sys.stderr,
            )
        except OSError as e:
            raise _cannot_write(folder, "trainer.default_root_dir", e) from None


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
        self._claimed = False
        self._error: str | None = None

    @classmethod
    def of(cls, trainer: Trainer) -> RunLock:
        """The trainer's `RunLock` (a new one when it has none), holding the log folder of a starting `fit` from now
        on (`claim_log_folder`): what `QLoRAModule.configure_callbacks` adds to every trainer."""
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector, undeclared
        lock = next((c for c in callbacks if isinstance(c, cls)), None) or cls()
        lock.claim_log_folder(trainer)
        return lock

    def claim_log_folder(self, trainer: Trainer) -> None:
        """Lock the log folder of a starting `fit` (global rank 0), creating a numbered version folder itself.

        `QLoRAModule.configure_callbacks` calls this, the first hook of a `fit`: Lightning picks the logger's
        version just after it, and the CSV logger opens its folder before any callback's `setup`, deleting a
        `metrics.csv` it finds there (another run's, when both picked one number). An error is raised here in a
        single process; with several it is kept for `setup`, where every rank raises it (rank 0 alone stopping
        would leave the others waiting)."""
        if self._claimed or trainer.state.fn != TrainerFn.FITTING:
            return
        self._claimed = True
        logger = trainer.loggers[0] if trainer.loggers else None
        if trainer.is_global_zero and isinstance(logger, (CSVLogger, TensorBoardLogger)):
            try:
                if _numbered_by_the_logger(logger):
                    _create_a_version_folder(logger)
                self._lock(Path(logger.log_dir), "trainer.default_root_dir, the logger's version")
            except RunFolderError as e:
                if trainer.world_size == 1:
                    raise
                self._error = str(e)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.claim_log_folder(trainer)  # here when no QLoRAModule claimed it earlier
        error, version = self._error, None
        if trainer.is_global_zero and error is None:
            try:
                version = self._lock_checkpoint_folders(trainer)
            except RunFolderError as e:
                error = str(e)
        error, version = trainer.strategy.broadcast((error, version))
        if error is not None:
            raise RunFolderError(error)
        logger = trainer.loggers[0] if trainer.loggers else None
        if version is not None and isinstance(logger, (CSVLogger, TensorBoardLogger)):
            _use_version(logger, version)  # every rank's logger: the checkpoint callbacks take their folder from it

    def _lock_checkpoint_folders(self, trainer: Trainer) -> int | None:
        """Lock every checkpoint callback's folder; return the log version this run holds (None when the logger
        numbers none)."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                self._lock(_checkpoint_folder(trainer, callback), "checkpoint.dirpath")
        logger = trainer.loggers[0] if trainer.loggers else None
        return int(logger.version) if _numbered_version(logger) else None

    def _lock(self, folder: Path, key: str) -> None:
        folder = folder.resolve()
        if all(folder != held.folder for held in self._held):
            self._held.append(_Lock(folder, key))

    def release(self) -> None:
        """Release every lock this run holds (at the end of `fit`, or when it fails)."""
        while self._held:
            self._held.pop().release()
        self._claimed, self._error = False, None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.release()
