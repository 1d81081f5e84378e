"""Atomic writes: whole or nothing, the user's umask, leftovers of killed writes, a full disk named."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from qlora_lightning.atomic import WriteError, atomic_folder, check_writable, remove_leftovers, write_file, write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_folders_get_the_umask_permissions(tmp_path, umask_022):
    import torch
    from safetensors.torch import save_file

    write_text(tmp_path / "report.json", "{}")
    with atomic_folder(tmp_path / "export") as folder:
        (folder / "config.json").write_text("{}")
        save_file({"w": torch.zeros(2)}, folder / "model.safetensors")  # safetensors creates its files 0600
        (folder / "shards").mkdir(mode=0o700)
        (folder / "shards" / "a.bin").touch(mode=0o600)
    assert mode(tmp_path / "report.json") == 0o644  # tempfile alone would leave 0600
    assert mode(tmp_path / "export") == 0o755  # and 0700
    assert mode(tmp_path / "export" / "config.json") == 0o644
    assert mode(tmp_path / "export" / "model.safetensors") == 0o644
    assert mode(tmp_path / "export" / "shards") == 0o755 and mode(tmp_path / "export" / "shards" / "a.bin") == 0o644


def test_leftovers_of_killed_writes_are_removed_by_the_next_write(tmp_path):
    (tmp_path / ".last.ckpt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".export.xyz.tmp").mkdir()
    (tmp_path / ".other.ckpt.abc.tmp").write_bytes(b"another file's: kept")
    write_text(tmp_path / "last.ckpt", "new")
    remove_leftovers(tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.ckpt.abc.tmp", "last.ckpt"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_nothing(tmp_path):
    target = write_text(tmp_path / "last.ckpt", "previous")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    with pytest.raises(WriteError, match=f"cannot write {target}.*MiB free.*the previous file is kept"):
        write_file(target, half_then_fail)
    assert target.read_text() == "previous" and sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def test_errors_that_are_not_io_pass_through_unchanged(tmp_path):
    def bad_value(tmp):
        raise ValueError("a NaN in the adapter")

    with pytest.raises(ValueError, match="a NaN in the adapter"):
        write_file(tmp_path / "a.safetensors", bad_value)
    with pytest.raises(ValueError, match="a NaN"), atomic_folder(tmp_path / "out"):
        raise ValueError("a NaN in the adapter")
    assert os.listdir(tmp_path) == []


def test_an_existing_folder_is_replaced_only_when_asked_and_only_once_complete(tmp_path):
    with atomic_folder(tmp_path / "out") as folder:
        (folder / "a").write_text("1")
    with pytest.raises(FileExistsError, match="exists"), atomic_folder(tmp_path / "out"):
        pass
    with pytest.raises(OSError), atomic_folder(tmp_path / "out", overwrite=True) as folder:
        (folder / "a").write_text("2")
        raise OSError("disk full")
    assert (tmp_path / "out" / "a").read_text() == "1"
    with atomic_folder(tmp_path / "out", overwrite=True) as folder:
        (folder / "b").write_text("2")
    assert os.listdir(tmp_path / "out") == ["b"] and os.listdir(tmp_path) == ["out"]


def test_a_file_is_never_replaced_by_a_folder(tmp_path):
    """A mistyped output (`m.gguf` for a folder export) must not lose the file, even with overwrite."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF a model")
    with (
        pytest.raises(FileExistsError, match=r"m\.gguf is a file; a folder is written here"),
        atomic_folder(tmp_path / "m.gguf", overwrite=True) as folder,
    ):
        (folder / "config.json").write_text("{}")
    assert (tmp_path / "m.gguf").read_bytes() == b"GGUF a model" and os.listdir(tmp_path) == ["m.gguf"]


def test_a_full_disk_names_the_checkpoint(tmp_path):
    """A real write past the file-size limit (RLIMIT_FSIZE: the same EFBIG path as a full disk) through the
    checkpoint I/O: torch.save's own message names no file."""
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from pathlib import Path
        from qlora_lightning.checkpoint import AtomicCheckpointIO
        path = Path({str(tmp_path)!r}) / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint({{"global_step": 1, "state_dict": {{}}}}, path)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            AtomicCheckpointIO().save_checkpoint({{"global_step": 2, "state_dict": {{"w": torch.zeros(100_000)}}}}, path)
        except OSError as e:
            print("ERROR", e)
        print("STEP", torch.load(path, weights_only=True)["global_step"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"ERROR cannot write {tmp_path / 'last.ckpt'}" in done.stdout and "the previous file is kept" in done.stdout
    assert "STEP 1" in done.stdout  # the previous checkpoint is whole
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_check_writable_makes_the_folder_and_fails_where_a_real_write_fails(tmp_path):
    """The one "is this folder writable" of the run lock, the data cache and the built-in model cache: a folder is
    made and written to (and left empty); a path under a file fails, and so does /proc, which `os.access` calls
    writable for root: the check writes, it does not ask."""
    made = check_writable(tmp_path / "new" / "runs")
    assert made == tmp_path / "new" / "runs" and made.is_dir() and not list(made.iterdir())
    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError):
        check_writable(tmp_path / "a_file" / "cache")
    if os.path.isdir("/proc/self"):
        with pytest.raises(OSError):
            check_writable("/proc")
