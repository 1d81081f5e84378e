"""Parallel tokenization: the `map` worker processes die with the main process instead of running on as orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import multiprocess
import pytest

from qlora_lightning.data.sources import PARALLEL_MIN_RECORDS

# Builds the data module with 2 tokenizing processes; each worker marks its pid, then tokenizes slowly enough
# to be caught at work. Run with: tokenizer folder, data file, cache folder, folder for the marks.
SETUP_SLOWLY = """
import os, sys, time
from pathlib import Path
from qlora_lightning.data import InstructionDataModule
from qlora_lightning.data.tokenize import ExampleEncoder

tokenizer, data, cache, marks = sys.argv[1:]
encode = ExampleEncoder.encode

def slow_encode(self, examples):
    Path(marks, str(os.getpid())).touch()
    time.sleep(300)
    return encode(self, examples)

ExampleEncoder.encode = slow_encode  # the workers are forked, so they have it too
dm = InstructionDataModule(tokenizer=tokenizer, dataset=data, max_examples=None, val_size=0, num_proc=2, num_workers=0,
                           cache_dir=cache)
dm.setup("fit")
"""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def _running(pid: int) -> bool:
    """Whether the process exists and has not ended (a zombie has ended, only not been reaped yet)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """The pids of the processes whose parent is `pid`."""
    stats = {int(p.name): _stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    return [child for child, stat in stats.items() if stat and stat[1] == pid]


def _wait_until(condition, timeout: float, what: str):
    """Poll `condition` until it returns something true, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.1)
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's (prctl)")
@pytest.mark.skipif(multiprocess.get_all_start_methods()[0] != "fork", reason="only forked workers are set to die")
def test_tokenizing_processes_die_when_the_main_process_is_killed(tmp_path, bos_tokenizer, write_jsonl, orca_records):
    bos_tokenizer.save_pretrained(tmp_path / "tok")
    data = write_jsonl(orca_records(PARALLEL_MIN_RECORDS))  # the fewest records that are tokenized in parallel
    marks = tmp_path / "marks"
    marks.mkdir()
    args = [str(tmp_path / "tok"), str(data), str(tmp_path / "cache"), str(marks)]
    main = subprocess.Popen([sys.executable, "-c", SETUP_SLOWLY, *args])
    children: list[int] = []
    try:

        def tokenizing():
            assert main.poll() is None, "the data module's setup ended before its workers tokenized"
            found = [int(p.name) for p in marks.iterdir()]
            return found if len(found) >= 2 else None

        workers = _wait_until(tokenizing, 120, "2 workers tokenize")
        children = _children(main.pid)  # the workers, and the manager of the queue that `datasets` starts
        assert set(workers) < set(children)
        main.kill()  # SIGKILL: the main process cannot clean up
        main.wait()
        _wait_until(lambda: not any(map(_running, children)), 5, f"the orphaned processes {children} end")
    finally:
        children = children or _children(main.pid)
        main.kill()
        main.wait()
        for pid in children:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)  # what the test started must not outlive it, even when it fails


# Tokenizes in parallel (2 forked workers), then forks a child of its own and prints the child's parent-death signal.
FORK_AFTER_TOKENIZING = """
import ctypes, os, sys
from qlora_lightning.data import InstructionDataModule, sources

sources.PARALLEL_MIN_RECORDS = 0
tokenizer, data, cache = sys.argv[1:]
InstructionDataModule(tokenizer=tokenizer, dataset=data, val_size=0, num_proc=2, num_workers=0,
                      cache_dir=cache).setup("fit")
signal = ctypes.c_int(-1)
read, write = os.pipe()
if (pid := os.fork()) == 0:
    ctypes.CDLL(None).prctl(2, ctypes.byref(signal))  # PR_GET_PDEATHSIG
    os.write(write, str(signal.value).encode())
    os._exit(0)
os.waitpid(pid, 0)
print("child's parent-death signal:", os.read(read, 16).decode())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's (prctl)")
@pytest.mark.skipif(multiprocess.get_all_start_methods()[0] != "fork", reason="only forked workers are set to die")
def test_the_fork_hook_leaves_the_callers_own_forks_alone(tmp_path, bos_tokenizer, write_jsonl, orca_records):
    """The hook `os.register_at_fork` installs is process-wide: a process the caller forks after the data module's
    parallel tokenization must not be set to die with its parent."""
    bos_tokenizer.save_pretrained(tmp_path / "tok")
    args = [str(tmp_path / "tok"), str(write_jsonl(orca_records(40))), str(tmp_path / "cache")]
    done = subprocess.run([sys.executable, "-c", FORK_AFTER_TOKENIZING, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "cache" / "qlora_lightning").glob("*_of_00002.arrow"))  # tokenized by forked workers
    assert done.stdout.splitlines()[-1] == "child's parent-death signal: 0"
