"""Atomic writes: a file or a folder appears under its final name whole, or not at all.

Everything the toolkit writes (checkpoints, adapter folders, the converted built-in model, merged exports,
reports) goes through here. Each is written under a hidden temporary name beside its final one
(`.<name>.<random>.tmp`) and renamed into place, so a kill, a crash or a full disk mid-write leaves the
previous version whole. Three things plain `tempfile` + `os.replace` get wrong are handled once:
- permissions: temporary files are created 0600 and folders 0700, which the rename would keep, and some writers
  (safetensors) create their files 0600 too; a finished file, folder and everything inside the folder get what
  the user's umask gives, so colleagues on a shared cluster can read them;
- leftovers: a write killed before it could clean up leaves its temporary behind; the next write of the same
  name removes it;
- errors: torch and safetensors report a full disk without naming the file; a failed write here raises
  `WriteError` naming the final path, the free space left, and what was kept.

`check_writable` answers, before any long work, whether a folder can take those writes at all; its callers (the
run lock, the data cache, the built-in model cache) each name their own key in the error they raise.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError

__all__ = ["WriteError", "check_writable", "write_file", "write_text", "atomic_folder", "remove_leftovers"]

_TMP_SUFFIX = ".tmp"
# What a failing write raises: the OS, torch.save ("[enforce fail at inline_container.cc]" on a full disk) and
# safetensors. Other exceptions (a bad value found while writing) pass through unchanged.
_IO_ERRORS = (OSError, RuntimeError, SafetensorError)


class WriteError(OSError):
    """Writing a file or folder failed; the message names it and says what was kept."""


def check_writable(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and write a scratch file in it; return it, or let the `OSError` through.

    A real write, not `os.access`: the superuser passes any permission check, but not a path whose parent is a
    file or a read-only file system. The caller turns the error into its own, naming the key that chose `folder`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()
    return folder


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    """Give `folder`, its subfolders and its files the modes a plain `mkdir` / `open` would have given them under
    the user's umask (0755 / 0644 under 022), whatever mode their writer chose. Links are left alone."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, folders, files in os.walk(folder):
        for name in folders:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_leftovers(path: Path) -> None:
    """Remove the temporaries that killed writes of `path` left beside it (`.<name>.*.tmp`)."""
    for stale in path.parent.glob(f"{glob.escape(_temporary_prefix(path))}*{_TMP_SUFFIX}"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _failure(path: Path, error: BaseException, kept: str) -> WriteError:
    try:
        free = f"; {shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free on its disk"
    except OSError:
        free = ""
    return WriteError(f"cannot write {path}: {error}{free}; {kept}")


def write_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(temporary_path)`, flush it to disk, then rename it onto `path`.

    Raises `WriteError` (naming `path`) if anything fails; the previous `path`, if any, is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=_TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except _IO_ERRORS as e:
        tmp.unlink(missing_ok=True)
        raise _failure(path, e, "the previous file is kept" if path.exists() else "nothing was written") from e
    except BaseException:  # anything else (a KeyboardInterrupt too): clean up, and let it through unchanged
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`write_file` for UTF-8 text (JSON reports, configs)."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block ends without error it becomes `path`, its
    files and subfolders given the umask's permissions (`_apply_umask`).

    An existing `path` is an error unless `overwrite`; then it is replaced only once the new folder is
    complete. An existing file (not a folder) is never replaced by a folder: that is always an error, as a
    mistyped output (`m.gguf` for a folder export) would otherwise lose the file. A failure removes the temporary
    folder and raises `WriteError` naming `path`.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; a folder is written here, so choose another output (kept as it is)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another output or pass overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=_TMP_SUFFIX))
    try:
        yield tmp
        _apply_umask(tmp)
        if path.exists():  # moved aside under a temporary name: a kill here leaves it for remove_leftovers
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=_TMP_SUFFIX))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except WriteError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except _IO_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _failure(path, e, "the previous folder is kept" if path.exists() else "nothing was written") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
