"""FSDP: the decoder-layer wrap policy, the storage rule, the config overlay, and (2 GPUs) a real run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_lightning.checkpoint import is_adapter_key
from qlora_lightning.cli import run_lightning_cli
from qlora_lightning.fsdp import check_shardable, decoder_layer_policy
from qlora_lightning.model import QuantSpec
from test_cli import cli_args

REPO = Path(__file__).resolve().parents[1]


def test_policy_makes_each_decoder_layer_a_unit():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         vocab_size=64)
    model = LlamaForCausalLM(config)
    wrapped = [n for n, m in model.named_modules() if decoder_layer_policy(m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert decoder_layer_policy(model, recurse=True, nonwrapped_numel=0)  # always look inside


def test_packed_weights_must_be_stored_in_the_compute_dtype():
    with pytest.raises(ValueError, match="quant_storage to 'bfloat16'"):
        check_shardable(QuantSpec())  # uint8 storage: FSDP cannot flatten it with bf16 LoRA weights
    check_shardable(QuantSpec(quant_storage="bfloat16"))
    check_shardable(QuantSpec(quantize="none"))


def test_fsdp_overlay_parses_into_the_strategy(tmp_path, monkeypatch):
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    # Lightning refuses FSDP without a GPU when the trainer is built; this test only checks the parse.
    monkeypatch.setattr(_AcceleratorConnector, "_check_strategy_and_fallback", lambda self: None)
    cli = run_lightning_cli(["--config", str(REPO / "configs" / "70b.yaml"), "--config", str(REPO / "configs" / "fsdp.yaml"),
                             "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"] is decoder_layer_policy and strategy.kwargs["use_orig_params"]
    assert cli.model.quant.quant_storage == cli.model.quant.compute_dtype == "bfloat16"
    assert cli.model.lora.r == 64  # the 70B recipe itself is untouched


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp_on_two_gpus_saves_adapters_once_and_resumes_on_one(tiny_chat_llama_dir, tmp_path):
    gpu = dict(trainer__accelerator="cuda", trainer__precision="bf16-true", model__quant__compute_dtype="bfloat16",
               config=REPO / "configs" / "fsdp.yaml")
    two = subprocess.run(cli_args(tiny_chat_llama_dir, tmp_path, max_steps=4, every=2, trainer__devices=2, **gpu),
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["last", "last.ckpt", "step=2", "step=2.ckpt", "step=4", "step=4.ckpt"]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["state_dict"] and all(is_adapter_key(k) for k in state["state_dict"])
    last_adapter = load_file(tmp_path / "checkpoints" / "last" / "adapter_model.safetensors")
    (final,) = tmp_path.glob("lightning_logs/version_*/adapter/adapter_model.safetensors")
    final_adapter = load_file(final)  # written at the end of fit from the adapters gathered over both GPUs
    assert final_adapter.keys() == last_adapter.keys()
    assert all(torch.equal(final_adapter[k], last_adapter[k]) for k in last_adapter)

    # Same global batch on one GPU: micro-batch 2 × accumulation 2 × 1 device = 2 × 1 × 2.
    one = subprocess.run(cli_args(tiny_chat_llama_dir, tmp_path, max_steps=6, every=2, trainer__devices=1,
                                  trainer__accumulate_grad_batches=2, **gpu) + ["--ckpt_path", "last"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "Restored all states" in one.stderr + one.stdout
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6
    moved = [k for k in state["state_dict"] if not torch.equal(state["state_dict"][k], resumed["state_dict"][k])]
    assert moved, "the adapters did not train after the resume"
