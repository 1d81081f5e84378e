"""Lightning checkpoint files: atomic writes, the PEFT folder beside each, what each says, what is never written."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from qlora_lightning.adapters import FINGERPRINT_KEY, STEP_KEY, read_adapter
from qlora_lightning.checkpoint import AtomicCheckpointIO


def test_atomic_checkpoint_io_survives_a_failed_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"m.lora_A": torch.ones(2, 3)}, "step": 1}, path)
    before = path.read_bytes()

    def dies(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {}, "step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


def test_checkpoint_io_writes_and_removes_the_peft_folder(tmp_path):
    io = AtomicCheckpointIO()
    ckpt = {
        "state_dict": {"model.x.lora_A": torch.ones(2, 3), "model.x.lora_B": torch.zeros(4, 2)},
        "peft_adapter_config": {"peft_type": "LORA", "r": 2},
        "peft_key_prefix": "model.",
    }
    io.save_checkpoint(ckpt, tmp_path / "step=5.ckpt")
    assert set(load_file(tmp_path / "step=5" / "adapter_model.safetensors")) == {
        "base_model.model.x.lora_A.weight",
        "base_model.model.x.lora_B.weight",
    }
    io.remove_checkpoint(tmp_path / "step=5.ckpt")
    assert not os.listdir(tmp_path)


def test_each_adapter_folder_says_its_step_and_base(tmp_path):
    """The `.ckpt` is written first; a kill before its PEFT folder follows leaves a folder one step older, so
    each file says which step it holds."""
    io = AtomicCheckpointIO()
    ckpt = {
        "global_step": 7,
        "state_dict": {"model.x.lora_A": torch.ones(2, 3), "model.x.lora_B": torch.ones(4, 2)},  # r 2, in 3, out 4
        "qlora_run": {"base_fingerprint": "f00"},
        "peft_adapter_config": {"peft_type": "LORA", "r": 2},
        "peft_key_prefix": "model.",
    }
    io.save_checkpoint(ckpt, tmp_path / "last.ckpt")
    metadata = read_adapter(tmp_path / "last").metadata
    assert metadata[STEP_KEY] == "7" and metadata[FINGERPRINT_KEY] == "f00"
    assert io.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 7


def test_a_non_finite_adapter_is_never_written(tmp_path):
    io = AtomicCheckpointIO()
    ckpt = {
        "global_step": 3,
        "state_dict": {"model.x.lora_A": torch.tensor([[1.0, float("nan")]])},
        "peft_adapter_config": {"peft_type": "LORA", "r": 1},
        "peft_key_prefix": "model.",
    }
    with pytest.raises(FloatingPointError, match="x.lora_A.weight holds NaN or inf"):
        io.save_checkpoint(ckpt, tmp_path / "last.ckpt")
    assert os.listdir(tmp_path) == []
