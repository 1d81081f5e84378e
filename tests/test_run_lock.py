"""One run per folder, with two real processes at once: new runs get their own version folders, a second run of a
folder in use is refused naming the process that holds it, and a killed run leaves no lock behind."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.fabric.loggers.csv_logs import CSVLogger
from qlora_testing import REPO, cli_args, cpu_trainer, tiny_module_and_data

from qlora_lightning.cli import main
from qlora_lightning.resume import read_checkpoint
from qlora_lightning.run_lock import RunFolderError, lock_path

HERE = Path(__file__).resolve().parent


def choosing_at_once(barrier: Path, choose, then_wait: float = 0.0):
    """`CSVLogger._get_next_version` that, once it has chosen, waits until two processes have: both then hold the
    same number, as two runs started at the same moment do (neither has created its folder yet). `then_wait`
    seconds more let the other run train first: the worst case, where Lightning's CSV logger, opening a folder
    that is not empty, deleted the `metrics.csv` the other run had written there."""

    def at_once(logger):
        version = choose(logger)
        (barrier / str(os.getpid())).touch()
        deadline = time.time() + 300
        while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(then_wait)
        return version

    return at_once


# `python -c RACER <barrier> <seconds> <train.py arguments>`: train.py with `choosing_at_once`.
RACER = f"""
import sys
sys.path[:0] = [{str(REPO)!r}, {str(HERE)!r}]
from pathlib import Path
from lightning.fabric.loggers.csv_logs import CSVLogger
from test_run_lock import choosing_at_once
CSVLogger._get_next_version = choosing_at_once(Path(sys.argv[1]), CSVLogger._get_next_version, float(sys.argv[2]))
from qlora_lightning.cli import main
main(sys.argv[3:])
"""


def test_two_new_runs_started_at_once_get_their_own_version_folders(tiny_chat_llama_dir, tmp_path, monkeypatch):
    """Both took `version_0`: metrics.csv mixed both runs, and one's clean-up of leftover temporaries deleted the
    other's and killed it. Here one process is this test, the other a `train.py` that picks its number with this
    one and goes on 10 s later, when this one has trained: Lightning's CSV logger, opening a folder that is not
    empty, would delete the `metrics.csv` there."""
    barrier, root = tmp_path / "barrier", tmp_path / "root"
    barrier.mkdir()
    args = cli_args(tiny_chat_llama_dir, root, 3, 3, checkpoint_dir=False, trainer__log_every_n_steps=1)[2:]
    other = subprocess.Popen(
        [sys.executable, "-c", RACER, str(barrier), "10", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    monkeypatch.setattr(CSVLogger, "_get_next_version", choosing_at_once(barrier, CSVLogger._get_next_version))
    main(args)
    other_err = other.communicate(timeout=600)[1]
    assert other.returncode == 0, other_err[-3000:]
    logs = root / "lightning_logs"
    moved = f"{logs / 'version_0'} was taken by a run started at the same moment: this run logs to {logs / 'version_1'}"
    assert moved in other_err, other_err[-3000:]
    for version in (0, 1):
        folder = root / "lightning_logs" / f"version_{version}"
        assert read_checkpoint(folder / "checkpoints" / "last.ckpt")["global_step"] == 3
        with open(folder / "metrics.csv") as f:
            steps = [row["step"] for row in csv.DictReader(f) if row["train/loss"]]
        assert steps == ["0", "1", "2"], (folder / "metrics.csv").read_text()  # this run's steps, each once
        assert (folder / "adapter" / "adapter_model.safetensors").is_file() and (folder / "config.yaml").is_file()
    assert not list(root.glob("**/.*.lock"))  # released and removed at the end


def test_a_second_run_of_a_folder_in_use_is_refused_naming_the_process_and_the_lock_ends_with_it(
    tiny_chat_llama_dir, tmp_path
):
    """Two `--ckpt_path last` resumes of one run wrote the same folders, one final adapter over the other. The
    second is refused, from the command line and from a plain `lightning.Trainer`, naming the first; once the
    first is killed (SIGKILL: no clean-up at all) the run resumes."""

    def fit(max_steps, *extra):
        main(cli_args(tiny_chat_llama_dir, tmp_path, max_steps, 2, checkpoint_dir=False)[2:] + list(extra))

    fit(2)
    ckpts = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    first = subprocess.Popen(
        cli_args(tiny_chat_llama_dir, tmp_path, 100000, 2, checkpoint_dir=False) + ["--ckpt_path", "last"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    deadline = time.time() + 240
    while not (lock_path(ckpts).is_file() and f'"pid": {first.pid}' in lock_path(ckpts).read_text()):
        assert first.poll() is None and time.time() < deadline, "the first resume did not take the folder"
        time.sleep(0.05)
    holder = f"is in use by process {first.pid} on {re.escape(socket.gethostname())} \\(since "
    with pytest.raises(SystemExit, match=f"error: {re.escape(str(ckpts))} \\(checkpoint.dirpath\\) {holder}"):
        fit(100000, "--ckpt_path", "last")
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    with pytest.raises(RunFolderError, match=holder):
        cpu_trainer(ckpts.parent, max_steps=2).fit(module, data)

    first.send_signal(signal.SIGKILL)
    first.wait()
    assert json.loads(lock_path(ckpts).read_text())["pid"] == first.pid  # the file stays; its lock went
    killed_at = read_checkpoint(ckpts / "last.ckpt")["global_step"]
    fit(killed_at + 2, "--ckpt_path", "last")
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == killed_at + 2


def test_a_log_folder_that_cannot_be_created_is_named_before_the_model_loads(tiny_chat_llama_dir, tmp_path):
    """A plain `lightning.Trainer` whose `default_root_dir` nobody can create (its parent is a file: the superuser,
    here and in CI, may write anywhere else) failed inside Lightning's logger with a bare OSError."""
    (tmp_path / "a_file").write_text("")
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    folder = tmp_path / "a_file" / "root" / "lightning_logs" / "version_0"
    with pytest.raises(RunFolderError, match=f"cannot write {re.escape(str(folder))} \\(trainer.default_root_dir\\)"):
        cpu_trainer(tmp_path / "a_file" / "root", max_steps=2).fit(module, data)
    assert module.model is None
