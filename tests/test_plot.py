"""plot-loss: curves from a CSVLogger metrics.csv into a PNG; clear errors on missing logs."""

from __future__ import annotations

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
