"""`qlora-lightning plot-loss`: training and validation loss curves from a run's CSV log, as a PNG."""

from __future__ import annotations

import csv
from pathlib import Path


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


def plot_loss(log_dir: str, output: str | None = None) -> str:
    """Plot training and validation loss of a run.

    Args:
        log_dir: the run's log folder holding `metrics.csv` (e.g. lightning_logs/version_0).
        output: the PNG to write; default `<log_dir>/loss.png`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_loss_curves(Path(log_dir) / "metrics.csv")
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if key == "val/loss" else None, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (labelled tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    out = output or str(Path(log_dir) / "loss.png")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out}")
    return out
