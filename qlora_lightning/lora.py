"""The LoRA layer: a frozen base linear (NF4/FP4 via bitsandbytes, or plain bf16) plus trainable A/B.

`LoraLinear4bit` is the QLoRA layer (Dettmers et al. 2023, section 3); `LoraLinear16bit` is its twin
with an unquantized bf16 base, used for the paper's 16-bit LoRA comparison. `inject_lora` swaps them in
for the `nn.Linear` layers of a model and freezes everything else.

Training runs through `lora_autograd.lora_linear` (base matmul and LoRA update under one hand-written
autograd function); inference keeps bitsandbytes' own kernels plus `lora_delta`.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Literal

import bitsandbytes as bnb
import torch
from bitsandbytes import functional as bnb_F
from torch import nn

from .lora_autograd import lora_linear

QuantType = Literal["nf4", "fp4", "none"]

#: The blocksize of the paper's NF4 (64 weights share one absmax constant).
NF4_BLOCKSIZE = 64


def lora_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, dropout: nn.Module, scaling: float) -> torch.Tensor:
    """`dropout(x) @ A^T @ B^T * scaling`, computed in the LoRA weights' dtype (bf16 by default).

    The scale is folded into the small (r × out) factor rather than applied to the activation-sized
    result: one full-size temporary fewer per layer.
    """
    x = dropout(x.to(lora_A.dtype))
    return (x @ lora_A.t()) @ (lora_B.t() * scaling)


class FrozenLinear:
    """The frozen base of a LoRA layer (mixed into a linear class): `forward(x)` is the plain frozen
    layer; `forward(x, lora=layer)` runs the LoRA layer's fused training path (`lora_autograd`).

    The LoRA layer calls its base as a module rather than reading its weight, because FSDP gathers a
    shard unit's weights when the unit is called: so each frozen base can be its own unit, and a unit
    of frozen weights only gets no gradient buffer (`fsdp.decoder_layer_policy`).
    """

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor, lora: "_LoraLinear | None" = None) -> torch.Tensor:
        if lora is None:
            return self.frozen_forward(x)
        p = lora.lora_dropout.p if lora.training and isinstance(lora.lora_dropout, nn.Dropout) else 0.0
        out = lora_linear(x.to(self.compute_dtype), lora.lora_A, lora.lora_B, self.bias, self.dense_weight,
                          scaling=lora.scaling, dropout_p=p)
        return out.to(x.dtype)

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone, in `x`'s dtype."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense (out × in) tensor in the compute dtype (dequantized if 4-bit)."""
        raise NotImplementedError

    def load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device | str) -> None:
        """Take a dense (out × in) weight (and bias) on `device`, quantized if 4-bit; the layer may still
        be on the meta device (that is how `model.load_model` builds it)."""
        raise NotImplementedError


class FrozenLinear4bit(FrozenLinear, bnb.nn.Linear4bit):
    """A frozen bitsandbytes 4-bit linear layer (NF4/FP4) that also runs the fused LoRA path."""

    def weight_quant_state(self) -> bnb_F.QuantState:
        """The weight's quantization state. FSDP replaces the weight by a plain tensor of the packed bytes,
        which has none: then the copy kept on the module (`quant_state`, as bitsandbytes keeps it) serves."""
        state = getattr(self.weight, "quant_state", None)
        return state if state is not None else self.quant_state

    def dense_weight(self) -> torch.Tensor:
        return bnb_F.dequantize_4bit(self.weight.data, self.weight_quant_state()).to(self.compute_dtype)

    @classmethod
    def empty(cls, in_features: int, out_features: int, *, bias: bool = False, quant_type: Literal["nf4", "fp4"] = "nf4",
              double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
              quant_storage: torch.dtype = torch.uint8) -> "FrozenLinear4bit":
        """The layer on the meta device, to be given its weight by `load_dense` (NF4 with double
        quantization and bf16 compute by default, as the paper)."""
        return cls(in_features, out_features, bias=bias, compute_dtype=compute_dtype, compress_statistics=double_quant,
                   quant_type=quant_type, quant_storage=quant_storage, device="meta")

    def load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device | str) -> None:
        # Cast to the compute dtype first, as transformers' own 4-bit loading does, so both give the same bytes.
        spec = self.weight
        self.weight = bnb.nn.Params4bit(weight.detach().to(self.compute_dtype), requires_grad=False,
                                        blocksize=NF4_BLOCKSIZE, compress_statistics=spec.compress_statistics,
                                        quant_type=spec.quant_type, quant_storage=spec.quant_storage).to(device)
        self.quant_state = self.weight.quant_state  # kept on the module too, for when FSDP replaces the parameter
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(device, self.compute_dtype), requires_grad=False)

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        # bitsandbytes' kernels (a 4-bit GEMV for single tokens), called directly: `Linear4bit.forward`
        # would re-wrap a plain (FSDP) weight in a new parameter object behind FSDP's back.
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        out = bnb.matmul_4bit(x.to(self.compute_dtype), self.weight.t(), bias=bias,
                              quant_state=self.weight_quant_state())
        return out.to(x.dtype)


class FrozenLinear16bit(FrozenLinear, nn.Linear):
    """A frozen plain linear layer (the 16-bit LoRA baseline's base) that also runs the fused LoRA path."""

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device | str) -> None:
        dtype = self.weight.dtype
        self.weight = nn.Parameter(weight.detach().to(device, dtype, copy=True), requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(device, dtype, copy=True), requires_grad=False)

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.compute_dtype), self.weight, self.bias).to(x.dtype)


class _LoraLinear(nn.Module):
    """Shared LoRA part: holds `base_layer` (frozen) and `lora_A`/`lora_B` (trainable).

    The attribute names follow PEFT (`base_layer`, `lora_A`, `lora_B`) so that checkpoint keys map
    one-to-one onto PEFT's adapter format.
    """

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, *, r: int, alpha: float,
                 dropout: float, lora_dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=lora_dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=lora_dtype, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's initialisation: A Kaiming-uniform (a=sqrt(5)), B zeros, so a fresh layer adds nothing."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def materialize_lora(self, device: torch.device | str, values: dict[str, torch.Tensor] | None = None) -> None:
        """Real A/B on `device` for a layer built on the meta device: copies of `values` (`{"lora_A": …,
        "lora_B": …}`, an adapter's) or, without them, PEFT's fresh initialisation."""
        self.lora_A = nn.Parameter(torch.empty_like(self.lora_A, device=device))
        self.lora_B = nn.Parameter(torch.empty_like(self.lora_B, device=device))
        if values is None:
            self.reset_lora_parameters()
        else:
            self.lora_A.copy_(values["lora_A"])
            self.lora_B.copy_(values["lora_B"])

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, device: torch.device | str | None = None, **kwargs):
        """Replace an `nn.Linear` by this layer, built from its weight and bias on `device` (default: its own)."""
        return cls.from_weight(linear.weight, linear.bias, device=device, **kwargs)

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen base's bias, as `nn.Linear.bias` (None for LLaMA's linears)."""
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.base_layer(x, lora=self)  # the fused training path, run by the base (see `FrozenLinear`)
        out = self.base_layer(x)
        return out.add_(lora_delta(x, self.lora_A, self.lora_B, self.lora_dropout, self.scaling).to(out.dtype))

    def base_weight(self) -> torch.Tensor:
        """The base weight as a dense bf16 (out × in) tensor, for merging and export."""
        return self.base_layer.dense_weight().detach().to(torch.bfloat16)

    def delta_weight(self) -> torch.Tensor:
        """`B @ A * scaling` in fp32: what the adapter adds to the base weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Dense base weight plus the LoRA update, summed in fp32 and returned in `dtype` (bf16)."""
        return (self.base_weight().float() + self.delta_weight()).to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"


class LoraLinear4bit(_LoraLinear):
    """QLoRA layer: frozen 4-bit base (`bnb.nn.Linear4bit`) + trainable bf16 LoRA A (r × in), B (out × r).

    Args:
        in_features / out_features / bias: as `nn.Linear`.
        r: LoRA rank (paper: 64 for every model size).
        alpha: LoRA scale numerator; the update is scaled by `alpha / r` (paper: 16).
        dropout: dropout on the LoRA input (paper: 0.1 up to 13B, 0.05 above).
        quant_type: "nf4" (the paper's NormalFloat) or "fp4".
        double_quant: quantize the absmax constants too (saves ~0.37 bit/param, paper section 3).
        compute_dtype: dtype of the dequantized matmul (bf16: range of fp32, speed of fp16).
        lora_dtype: dtype of A and B (bf16, as the paper's adapters).
        quant_storage: storage dtype of the packed 4-bit data; FSDP needs it equal to the other params'.
        device: where A/B are created; the base is quantized when moved to a device (`from_linear`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, r: int = 64, alpha: float = 16,
                 dropout: float = 0.1, quant_type: Literal["nf4", "fp4"] = "nf4", double_quant: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, lora_dtype: torch.dtype = torch.bfloat16,
                 quant_storage: torch.dtype = torch.uint8, device: torch.device | str | None = None) -> None:
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        base = FrozenLinear4bit.empty(in_features, out_features, bias=bias, quant_type=quant_type,
                                      double_quant=double_quant, compute_dtype=compute_dtype, quant_storage=quant_storage)
        super().__init__(base, in_features, out_features, r=r, alpha=alpha, dropout=dropout,
                         lora_dtype=lora_dtype, device=device)
        self.quant_type, self.double_quant = quant_type, double_quant

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                    device: torch.device | str | None = None, **kwargs) -> "LoraLinear4bit":
        """Build the layer from a dense (out × in) weight, quantizing it on `device` (default: the weight's)."""
        device = torch.device(device) if device is not None else weight.device
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, device=device, **kwargs)
        layer.base_layer.load_dense(weight, bias, device)
        return layer


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, *, device: torch.device | str,
                    quant_type: Literal["nf4", "fp4"] = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16,
                    quant_storage: torch.dtype = torch.uint8) -> "FrozenLinear4bit":
    """A frozen 4-bit linear layer (`FrozenLinear4bit`) holding `weight` quantized on `device` (blocksize
    64, as the paper)."""
    out_features, in_features = weight.shape
    layer = FrozenLinear4bit.empty(in_features, out_features, bias=bias is not None, quant_type=quant_type,
                                   double_quant=double_quant, compute_dtype=compute_dtype, quant_storage=quant_storage)
    layer.load_dense(weight, bias, device)
    return layer


class LoraLinear16bit(_LoraLinear):
    """The 16-bit twin of `LoraLinear4bit`: same LoRA, base kept as a frozen bf16 `nn.Linear`.

    The paper's 16-bit LoRA baseline (Table 3/4) uses this form; arguments as `LoraLinear4bit`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, r: int = 64, alpha: float = 16,
                 dropout: float = 0.1, compute_dtype: torch.dtype = torch.bfloat16,
                 lora_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        base = FrozenLinear16bit(in_features, out_features, bias=bias, dtype=compute_dtype, device=device)
        super().__init__(base, in_features, out_features, r=r, alpha=alpha, dropout=dropout,
                         lora_dtype=lora_dtype, device=device)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                    device: torch.device | str | None = None, **kwargs) -> "LoraLinear16bit":
        """Build the layer around a copy of a dense (out × in) weight, on `device` (default: the weight's)."""
        device = torch.device(device) if device is not None else weight.device
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, device="meta", **kwargs)
        layer.base_layer.load_dense(weight, bias, device)
        layer.materialize_lora(device)
        return layer


LoraLinear = _LoraLinear  # public name for isinstance checks over both kinds


def lora_layer_class(quantize: QuantType) -> type[_LoraLinear]:
    """The layer class for a `quantize` setting: 4-bit for nf4/fp4, 16-bit for none."""
    if quantize in ("nf4", "fp4"):
        return LoraLinear4bit
    if quantize == "none":
        return LoraLinear16bit
    raise ValueError(f"quantize must be one of 'nf4', 'fp4', 'none'; got {quantize!r}")


def lora_layer_kwargs(quantize: QuantType, *, r: int, alpha: float, dropout: float, double_quant: bool = True,
                      compute_dtype: torch.dtype = torch.bfloat16,
                      quant_storage: torch.dtype = torch.uint8) -> dict:
    """Constructor arguments for `lora_layer_class(quantize)`; A/B take the compute dtype (bf16 in the paper)."""
    kwargs = dict(r=r, alpha=alpha, dropout=dropout, compute_dtype=compute_dtype, lora_dtype=compute_dtype)
    if quantize != "none":
        kwargs.update(quant_type=quantize, double_quant=double_quant, quant_storage=quant_storage)
    return kwargs


def matches_target(name: str, target_modules: str | Iterable[str], exclude: Iterable[str] = ()) -> bool:
    """Whether the module called `name` is a LoRA target.

    `target_modules` is "all-linear" (the paper: every linear layer) or a list of module-name suffixes
    such as ["q_proj", "v_proj"] (a suffix matches a whole dotted component) or regexes ("re:...").
    `exclude` names suffixes never targeted (by default the output head, as QLoRA does).
    """
    def hit(pattern: str) -> bool:
        if pattern.startswith("re:"):
            return re.fullmatch(pattern[3:], name) is not None
        return name == pattern or name.endswith("." + pattern)

    if any(hit(p) for p in exclude):
        return False
    if target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    return any(hit(p) for p in target_modules)


def inject_lora(model: nn.Module, target_modules: str | Iterable[str] = "all-linear", exclude: Iterable[str] = ("lm_head",),
                r: int = 64, alpha: float = 16, dropout: float = 0.1, quantize: QuantType = "nf4",
                double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                device: torch.device | str | None = None) -> list[str]:
    """Replace every matching `nn.Linear` of `model` by a LoRA layer and freeze all other parameters.

    Defaults are the paper's recipe: LoRA on all linear layers but the output head, r=64, alpha=16,
    dropout 0.1, NF4 base with double quantization and bf16 compute. Returns the replaced names;
    raises `ValueError` if the targets match nothing.
    """
    layer_cls = lora_layer_class(quantize)
    kwargs = lora_layer_kwargs(quantize, r=r, alpha=alpha, dropout=dropout, double_quant=double_quant,
                               compute_dtype=compute_dtype)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches_target(n, target_modules, exclude)]
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"target_modules={target_modules!r} (exclude={tuple(exclude)!r}) matches no nn.Linear; "
                         f"the model's linear layers include {linear[:8]}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, layer_cls.from_linear(linear, device=device, **kwargs))
    return names


def unwrapped_name(name: str) -> str:
    """A module name as in the unwrapped model: FSDP inserts `_fsdp_wrapped_module.` levels."""
    return name.replace("_fsdp_wrapped_module.", "")


def lora_layers(model: nn.Module) -> dict[str, _LoraLinear]:
    """All LoRA layers of `model`, by module name (as in the unwrapped model, also under FSDP)."""
    return {unwrapped_name(n): m for n, m in model.named_modules() if isinstance(m, _LoraLinear)}
