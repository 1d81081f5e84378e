"""DemoReport: held-out loss and exact match before/after fit, on a tiny model and on the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
from qlora_testing import REPO, cpu_trainer, requires_cuda, tiny_module_and_data

from qlora_lightning import QLoRAModule
from qlora_lightning.cli import run_lightning_cli
from qlora_lightning.data import InstructionDataModule
from qlora_lightning.demo import DemoReport
from qlora_lightning.specs import LoraSpec, QuantSpec


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


@requires_cuda
@pytest.mark.slow
@pytest.mark.parametrize("layers", ["plain", "compiled", "compiled+offloaded"])
def test_the_real_models_held_out_loss_on_the_gpu_is_the_cpus(smollm2_dir, tmp_path, layers):
    """The demo's base (NF4, bf16 compute) scores the demo's held-out answers alike on the GPU, with each of
    demo-gpu.yaml's layer settings, and on the CPU of the same machine (bf16 there too)."""
    data = InstructionDataModule(
        smollm2_dir,
        dataset="bundled:orca_sample_train",
        val_dataset="bundled:orca_sample_val",
        format="openorca",
        eval_batch_size=8,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
    )
    losses = {}
    for accelerator in ("cpu", "gpu"):
        on_gpu = accelerator == "gpu"
        module = QLoRAModule(
            smollm2_dir,
            quant=QuantSpec(compute_dtype="bfloat16"),
            lora=LoraSpec(r=64, alpha=16, dropout=0.1),
            compile_layers=on_gpu and layers != "plain",
            gradient_checkpointing=on_gpu and layers == "compiled+offloaded",
            offload_activations=on_gpu and layers == "compiled+offloaded",
        )
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            precision="bf16-true",
            limit_val_batches=5,
            logger=False,
            enable_progress_bar=False,
            default_root_dir=tmp_path / accelerator,
        )
        (result,) = trainer.validate(module, data)
        losses[accelerator] = result["val/loss"]
    assert losses["gpu"] == pytest.approx(losses["cpu"], rel=0.03), losses
