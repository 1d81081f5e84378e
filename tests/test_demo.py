"""DemoReport: held-out loss and exact match before/after fit, on a tiny model and on the real SmolLM2; the report
written atomically."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import re
from pathlib import Path

import lightning as L
import pytest
from qlora_testing import REPO, cpu_trainer, requires_cuda, tiny_module_and_data

from qlora_lightning import QLoRAModule
from qlora_lightning.atomic import WriteError
from qlora_lightning.cli import run_lightning_cli
from qlora_lightning.data import InstructionDataModule
from qlora_lightning.demo import DemoReport
from qlora_lightning.specs import LoraSpec, QuantSpec


@pytest.fixture(scope="module")
def fitted(tiny_chat_llama_dir, tmp_path_factory):
    """Two optimizer steps of the tiny model with a `DemoReport`: (trainer, module, report callback, printed text)."""
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    t = cpu_trainer(tmp_path_factory.mktemp("demo"), max_steps=2)
    report = DemoReport(examples=4, max_new_tokens=3)
    t.callbacks.append(report)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        t.fit(module, data)
    return t, module, report, printed.getvalue()


def test_report_measures_before_and_after(fitted):
    t, _, _, printed = fitted
    report = json.loads((Path(t.log_dir) / "demo_report.json").read_text())
    assert report["before"]["n"] == report["after"]["n"] == 4
    assert report["after"]["loss"] != report["before"]["loss"]  # two optimizer steps changed the adapters
    assert report["before"]["question"] == "What is 79 + 60?" and report["before"]["reference"] == "139"
    assert "exact match (4 questions)" in printed


def test_a_resumed_run_reports_the_step_it_resumed_from_not_before(fitted, tiny_chat_llama_dir):
    """Extended from its checkpoint, a run starts from trained adapters: its first column is named by that step
    (a "before" there would pass the checkpoint's numbers off as the base model's)."""
    t, _, _, _ = fitted
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    resumed = cpu_trainer(t.default_root_dir, max_steps=3)
    resumed.callbacks.append(DemoReport(examples=4, max_new_tokens=3))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        resumed.fit(module, data, ckpt_path=str(Path(t.default_root_dir) / "checkpoints" / "last.ckpt"))
    report = json.loads((Path(resumed.log_dir) / "demo_report.json").read_text())
    assert (report["before"]["step"], report["after"]["step"]) == (2, 3)
    first = json.loads((Path(t.log_dir) / "demo_report.json").read_text())
    assert report["before"]["loss"] == pytest.approx(first["after"]["loss"])  # the checkpoint's adapters
    lines = printed.getvalue().splitlines()
    assert any(
        line.startswith("held-out (bundled sample)") and line.split()[-4:] == ["step", "2", "step", "3"]
        for line in lines
    )
    assert any(line.startswith("step 2:") for line in lines) and not any(line.startswith("before:") for line in lines)


def test_the_generation_batch_size_changes_no_answer(fitted, monkeypatch):
    """A GPU run of 500 examples generates in batches of 64: left padding must not change a greedy answer."""
    import qlora_lightning.demo as demo

    t, module, _, _ = fitted
    calls = []

    def recording_generate(*args, **kwargs):
        calls.append((kwargs["batch_size"], demo_generate(*args, **kwargs)))
        return calls[-1][1]

    demo_generate = demo.generate
    monkeypatch.setattr(demo, "generate", recording_generate)
    measured = [DemoReport(examples=4, max_new_tokens=3, batch_size=b)._measure(t, module) for b in (1, 4)]
    (one, answers_one), (four, answers_four) = calls
    assert (one, four) == (1, 4) and len(answers_one) == 4
    assert answers_one == answers_four and measured[0] == measured[1]
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        DemoReport(batch_size=0)


def test_a_failed_report_write_keeps_the_previous_report(fitted, monkeypatch):
    """demo_report.json was written in place: a full disk half-way left a truncated JSON file."""
    t, module, callback, _ = fitted
    path = Path(t.log_dir) / "demo_report.json"
    previous = path.read_text()
    write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        write_text(self, text[:20], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(WriteError, match=re.escape(f"cannot write {path}: ") + ".*the previous file is kept"):
        callback.on_fit_end(t, module)
    assert path.read_text() == previous and json.loads(previous)["after"]["n"] == 4
    assert not list(path.parent.glob(".demo_report.json.*"))  # no temporary left


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
