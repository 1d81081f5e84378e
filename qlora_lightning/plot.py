"""`qlora-lightning plot-loss`: training and validation loss curves from runs' CSV logs, as one PNG.

One run (`--log_dir lightning_logs/version_0`) gives its two curves; several runs (a list, or a glob pattern such
as `"runs/fidelity/curves/*"`) are drawn in one plot, one colour per run (training loss a line, validation loss
markers), labelled by the parts of their folder names that differ. The figure is drawn on its own Agg canvas, without
pyplot: plotting switches no process-wide backend, and the PNG is written atomically.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import write_file

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def read_loss_curves(metrics_csv: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{"train/loss": [(step, value), …], "val/loss": […]} from Lightning's CSVLogger `metrics.csv`."""
    path = Path(metrics_csv)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.csv (was the run logged with the default CSVLogger?)")
    curves: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": []}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for key, points in curves.items():
                if row.get(key):
                    points.append((int(row["step"]), float(row[key])))
    if not curves["train/loss"]:
        raise ValueError(f"{path}: no 'train/loss' column with values")
    return curves


def expand_log_dirs(log_dir: str | Sequence[str]) -> list[Path]:
    """The run folders `log_dir` names: one folder, a list of them, and glob patterns among them (sorted
    matches), in the order given. A pattern that matches nothing is an error, as is an empty list."""
    entries = [log_dir] if isinstance(log_dir, (str, os.PathLike)) else list(log_dir)
    folders: list[Path] = []
    for entry in entries:
        entry = str(entry)
        if glob.has_magic(entry):
            matches = sorted(Path(m) for m in glob.glob(entry) if Path(m).is_dir())
            if not matches:
                raise FileNotFoundError(f"{entry}: the pattern matches no folder")
            folders += matches
        else:
            folders.append(Path(entry))
    if not folders:
        raise ValueError("log_dir names no run")
    return folders


def run_labels(folders: Sequence[Path]) -> list[str]:
    """A label per run: the path parts that differ between the runs (leading and trailing parts that all runs
    share are dropped: runs/qlora/seed0 and runs/lora16/seed0 → "qlora", "lora16"); one run: its folder name."""
    parts = [Path(os.path.normpath(f)).parts for f in folders]
    if len(parts) == 1:
        return [parts[0][-1] if parts[0] else str(folders[0])]
    lead = 0
    while all(len(p) > lead + 1 for p in parts) and len({p[lead] for p in parts}) == 1:
        lead += 1
    trail = 0
    while all(len(p) > lead + trail + 1 for p in parts) and len({p[-1 - trail] for p in parts}) == 1:
        trail += 1
    labels = ["/".join(p[lead : len(p) - trail]) for p in parts]
    return labels if len(set(labels)) == len(labels) else [str(f) for f in folders]


def _agg_figure(figsize: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas: pyplot would select a backend for the whole process (and keep the figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def plot_loss(log_dir: list[str] | str, output: str | None = None, labels: list[str] | None = None) -> str:
    """Plot training and validation loss of one run, or of several runs in one plot.

    Args:
        log_dir: a run's log folder holding `metrics.csv` (e.g. lightning_logs/version_0), a list of them, or
            glob patterns (quoted, e.g. "runs/*/lightning_logs/version_0"): `--log_dir a --log_dir+ b`, or
            `--log_dir "[a, b]"`.
        output: the PNG to write; default `<log_dir>/loss.png` for one run, `loss.png` in the runs' common
            parent folder for several.
        labels: the legend's name of each run, in order; default: the parts of the folder paths that differ.
    """
    import matplotlib  # on use: matplotlib is needed by this command only

    folders = expand_log_dirs(log_dir)
    names = run_labels(folders) if labels is None else list(labels)
    if len(names) != len(folders):
        raise ValueError(f"{len(names)} labels for {len(folders)} runs ({', '.join(map(str, folders))})")
    runs = [read_loss_curves(folder / "metrics.csv") for folder in folders]
    several = len(runs) > 1
    fig = _agg_figure(figsize=(8, 4.5) if several else (7, 4))
    ax = fig.add_subplot()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, curves) in enumerate(zip(names, runs, strict=True)):
        for key, points in curves.items():
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            style: dict[str, Any] = {"marker": "o", "linestyle": "--" if several else "-"} if key == "val/loss" else {}
            if several:
                style["color"] = colors[k % len(colors)]
            ax.plot(steps, values, label=f"{name} {key}" if several else key, **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (labelled tokens)")
    ax.legend(fontsize="small" if several else None)
    ax.grid(alpha=0.3)
    if output is None:
        parent = Path(os.path.commonpath([os.path.abspath(f) for f in folders])) if several else folders[0]
        output = str(parent / "loss.png")
    file_type = Path(output).suffix[1:] or matplotlib.rcParams["savefig.format"]  # the temporary's name has none
    write_file(output, lambda tmp: fig.savefig(tmp, format=file_type, dpi=120, bbox_inches="tight"))
    print(f"wrote {output}")
    return output
