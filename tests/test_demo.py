"""DemoReport: held-out loss and exact match before/after fit, on a tiny model and on the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qlora_testing import REPO, cpu_trainer, tiny_module_and_data

from qlora_lightning.cli import run_lightning_cli
from qlora_lightning.demo import DemoReport


def test_report_measures_before_and_after(tiny_chat_llama_dir, tmp_path, capsys):
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    t = cpu_trainer(tmp_path, max_steps=2)
    t.callbacks.append(DemoReport(examples=4, max_new_tokens=3))
    t.fit(module, data)
    report = json.loads((Path(t.log_dir) / "demo_report.json").read_text())
    assert report["before"]["n"] == report["after"]["n"] == 4
    assert report["after"]["loss"] != report["before"]["loss"]  # two optimizer steps changed the adapters
    assert report["before"]["question"] == "What is 79 + 60?" and report["before"]["reference"] == "139"
    assert "exact match (4 questions)" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_config_trains_the_real_smollm2(tmp_path):
    """The README's main job, shortened: the held-out loss on answers must fall."""
    run_lightning_cli(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--trainer.max_steps",
            "8",
            "--trainer.val_check_interval",
            "8",
            "--checkpoint.every_n_train_steps",
            "8",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    (report_path,) = tmp_path.glob("lightning_logs/version_*/demo_report.json")
    report = json.loads(report_path.read_text())
    assert report["after"]["loss"] < report["before"]["loss"] - 0.5
    assert list(tmp_path.glob("lightning_logs/version_*/adapter/adapter_model.safetensors"))
