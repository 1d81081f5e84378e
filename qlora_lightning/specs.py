"""The recipe's two settings objects, and the one place their defaults live.

`QuantSpec` says how the frozen base is stored (the paper's NF4 with double quantization and bf16 compute);
`LoraSpec` says which layers get adapters and how large (the paper's r 64, alpha 16, dropout 0.1, every linear
layer). The LightningModule, the loader, the layers and the `generate` / `eval mmlu` / `export` commands all take
these objects, so a default is written once, here, with its reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["QuantSpec", "LoraSpec", "QuantType", "DTypeName", "torch_dtype"]

QuantType = Literal["nf4", "fp4", "none"]
DTypeName = Literal["bfloat16", "float16", "float32"]


def torch_dtype(name: str) -> torch.dtype:
    """`"bfloat16"` → `torch.bfloat16`, with a clear error for anything else."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; expected e.g. 'bfloat16', 'float16', 'float32'")
    return dtype


@dataclass(frozen=True)
class QuantSpec:
    """How the frozen base is stored.

    quantize: "nf4" (the paper's 4-bit NormalFloat, information-theoretically optimal for normally
        distributed weights), "fp4", or "none" (bf16 base: the paper's 16-bit LoRA comparison).
    double_quant: also quantize the quantization constants (paper: saves ~0.37 bit/parameter, 3 GB at 65B).
    compute_dtype: dtype of the matmuls, of the LoRA weights and of the unquantized parameters; bf16 as in
        the paper. CPUs without native bf16 matmul (AVX2 only) run bf16 matmuls 4-90x slower than float32: use
        float32 there (the CPU demo does). A `torch.dtype` (`torch.float32`) is accepted and stored as its name.
    quant_storage: dtype the packed 4-bit bytes are stored in; set it to the other parameters' dtype
        (bfloat16) to let FSDP shard the 4-bit weights with the rest. A `torch.dtype` is accepted too.
    """

    quantize: QuantType = "nf4"
    double_quant: bool = True
    compute_dtype: DTypeName = "bfloat16"
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"

    def __post_init__(self) -> None:
        for key in ("compute_dtype", "quant_storage"):  # users pass torch.float32 as often as "float32"
            value = getattr(self, key)
            if isinstance(value, torch.dtype):
                object.__setattr__(self, key, str(value).removeprefix("torch."))
        choices = {
            "quantize": ("nf4", "fp4", "none"),
            "compute_dtype": ("bfloat16", "float16", "float32"),
            "quant_storage": ("uint8", "bfloat16", "float16", "float32"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"quant.{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")


@dataclass(frozen=True)
class LoraSpec:
    """Which layers get adapters and how large they are.

    r: rank of A/B; the paper uses 64 at every size (and finds rank matters little when all layers get LoRA).
    alpha: the update is scaled by alpha / r; 16 as in the paper and the OpenOrca adapters.
    dropout: dropout on the LoRA input; paper: 0.1 for 7B/13B, 0.05 for 33B/65B.
    target_modules: "all-linear" (the paper: LoRA on every linear layer is needed to match 16-bit
        fine-tuning) or module-name suffixes such as ["q_proj", "v_proj"], or "re:<regex>".
    exclude: suffixes never adapted; the output head stays full precision as in QLoRA.
    """

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: str | tuple[str, ...] = "all-linear"
    exclude: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora.r must be a positive integer, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(
                f"lora.alpha must be a positive number, got {self.alpha!r}: the update is scaled by "
                "alpha / r, so 0 trains nothing (every lora_B gradient is zero) and a negative value "
                "flips it"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty; use 'all-linear' (the paper) or module-name suffixes")
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        for key, patterns in (("target_modules", targets), ("exclude", self.exclude)):
            for pattern in patterns:
                _check_regex(f"lora.{key}", pattern)


def _check_regex(key: str, pattern: str) -> None:
    """A `re:<regex>` entry of `key` must compile: a bad one is named here, not as a bare `re.error` later."""
    if not pattern.startswith("re:"):
        return
    try:
        re.compile(pattern[3:])
    except re.error as e:
        raise ValueError(
            f"{key}: {pattern!r} is not a valid regular expression ({e}); after 're:' comes a Python regex "
            "matched against the whole module name, e.g. 're:.*layers\\.[0-3]\\.mlp\\..*'"
        ) from None
