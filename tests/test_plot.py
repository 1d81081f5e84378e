"""plot-loss: curves from a CSVLogger metrics.csv into a PNG (written atomically, the caller's matplotlib backend
left alone); clear errors on missing logs."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_lightning.plot import plot_loss, read_loss_curves


def test_plot_loss_writes_a_png_with_both_curves(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss,val/loss\n0,0,2.5,\n0,1,2.0,\n0,1,,2.2\n0,2,1.5,\n")
    curves = read_loss_curves(tmp_path / "metrics.csv")
    assert curves == {"train/loss": [(0, 2.5), (1, 2.0), (2, 1.5)], "val/loss": [(1, 2.2)]}
    out = plot_loss(str(tmp_path))
    assert out.endswith("loss.png") and (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_or_empty_logs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        read_loss_curves(tmp_path / "metrics.csv")
    (tmp_path / "metrics.csv").write_text("epoch,step,val/loss\n0,1,2.0\n")
    with pytest.raises(ValueError, match="no 'train/loss'"):
        read_loss_curves(tmp_path / "metrics.csv")


def _log(folder, losses, val=None):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"0,{step},{loss}," for step, loss in enumerate(losses)] + ([f"0,{len(losses) - 1},,{val}"] if val else [])
    (folder / "metrics.csv").write_text("epoch,step,train/loss,val/loss\n" + "\n".join(rows) + "\n")
    return folder


def test_several_runs_in_one_plot_labelled_by_the_parts_of_their_folders_that_differ(tmp_path):
    from qlora_lightning.plot import expand_log_dirs, run_labels

    a = _log(tmp_path / "runs" / "qlora" / "seed0", [2.5, 2.0, 1.5], val=1.8)
    b = _log(tmp_path / "runs" / "lora16" / "seed0", [2.5, 1.9, 1.4], val=1.7)
    c = _log(tmp_path / "runs" / "lora16" / "seed1", [2.6, 2.0, 1.5])
    assert run_labels([a, b]) == ["qlora", "lora16"]  # the shared "runs/…" and "seed0" are dropped
    assert run_labels([a, b, c]) == ["qlora/seed0", "lora16/seed0", "lora16/seed1"]
    assert run_labels([a]) == ["seed0"]
    # A glob (sorted matches) and plain folders, in the order given.
    assert expand_log_dirs([str(tmp_path / "runs" / "*" / "seed0"), str(c)]) == [b, a, c]
    out = plot_loss([str(a), str(tmp_path / "runs" / "lora16" / "*")])
    assert out == str(tmp_path / "runs" / "loss.png")  # the runs' common parent folder
    assert (tmp_path / "runs" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labelled = plot_loss([str(a), str(b)], output=str(tmp_path / "two.png"), labels=["NF4", "bf16"])
    assert labelled == str(tmp_path / "two.png") and (tmp_path / "two.png").is_file()


def test_several_runs_through_the_cli_and_clear_errors(tmp_path):
    from qlora_lightning.cli import main

    a = _log(tmp_path / "qlora", [2.5, 2.0])
    b = _log(tmp_path / "lora16", [2.4, 1.9])
    main(["plot-loss", "--log_dir", str(a), "--log_dir+", str(b), "--output", str(tmp_path / "cli.png")])
    assert (tmp_path / "cli.png").is_file()
    main(["plot-loss", "--log_dir", f"[{a}, {b}]", "--output", str(tmp_path / "list.png")])
    assert (tmp_path / "list.png").is_file()
    with pytest.raises(FileNotFoundError, match="matches no folder"):
        plot_loss(str(tmp_path / "nothing*"))
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        plot_loss([str(a), str(b)], labels=["one"])
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        plot_loss([str(a), str(tmp_path)])


def test_plotting_leaves_the_callers_backend_and_pyplot_alone(tmp_path):
    """`matplotlib.use("Agg")` switched the backend of the whole process: a caller's own backend (here "svg") was lost."""
    log = _log(tmp_path / "run", [2.5, 2.0, 1.5])
    probe = (
        "import sys, matplotlib; matplotlib.use('svg'); from qlora_lightning.plot import plot_loss; "
        f"plot_loss({str(log)!r}); print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "svg False"
    assert (log / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_write_keeps_the_previous_plot(tmp_path, monkeypatch):
    """loss.png was written in place: a write that failed half-way (a full disk) left a truncated PNG."""
    from matplotlib.figure import Figure

    from qlora_lightning.atomic import WriteError

    log = _log(tmp_path / "run", [2.5, 2.0, 1.5])
    previous = Path(plot_loss(str(log))).read_bytes()

    def full_disk(self, path, **kwargs):
        Path(path).write_bytes(previous[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(
        WriteError, match=re.escape(f"cannot write {log / 'loss.png'}: ") + ".*the previous file is kept"
    ):
        plot_loss(str(log))
    assert (log / "loss.png").read_bytes() == previous
    assert sorted(p.name for p in log.iterdir()) == ["loss.png", "metrics.csv"]  # no temporary left
