"""The LoRA layer: a frozen base linear (NF4/FP4 via bitsandbytes, or plain bf16) plus trainable A/B.

`LoraLinear4bit` is the QLoRA layer (Dettmers et al. 2023, section 3); `LoraLinear16bit` is its twin with an
unquantized base, for the paper's 16-bit LoRA comparison. Both take the recipe's two settings objects
(`specs.LoraSpec`, `specs.QuantSpec`), so their defaults are the paper's and live in one place. `inject.py`
puts them into a model.

Training runs through `lora_autograd.lora_linear` (base matmul and LoRA update under one hand-written
autograd function); inference keeps bitsandbytes' own kernels plus `lora_delta`.
"""

from __future__ import annotations

import math

import bitsandbytes as bnb
import torch
from bitsandbytes import functional as bnb_F
from torch import nn

from .lora_autograd import accumulate_product, lora_linear
from .offload import keep_output, output_from_forward, recomputing
from .specs import LoraSpec, QuantSpec, torch_dtype

#: The blocksize of the paper's NF4 (64 weights share one absmax constant).
NF4_BLOCKSIZE = 64


def lora_delta(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    dropout: nn.Module,
    scaling: float,
    *,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """`dropout(x) @ A^T @ B^T * scaling`, computed in the LoRA weights' dtype (bf16 by default); with `into` (the
    frozen layer's output), added into it by the second matmul itself and `into` returned.

    The scale is folded into the small (r × out) factor rather than applied to the activation-sized
    result: one full-size temporary fewer per layer. With `into` there is no activation-sized delta at all (for an
    output that is materialised whole anyway; one read by a compiled consumer gets the add fused there).
    """
    h = dropout(x.to(lora_A.dtype)) @ lora_A.t()
    scaled_b = lora_B.t() * scaling
    if into is None:
        return h @ scaled_b
    flat = into.view(-1, into.shape[-1])
    accumulate_product(flat, h.reshape(-1, h.shape[-1]).to(into.dtype), scaled_b.to(into.dtype))
    return into


class FrozenLinear:
    """The frozen base of a LoRA layer (mixed into a linear class): `forward(x)` is the plain frozen
    layer; `forward(x, lora=layer)` runs the LoRA layer's fused training path (`lora_autograd`).

    The LoRA layer calls its base as a module rather than reading its weight, because FSDP gathers a
    shard unit's weights when the unit is called: so each frozen base can be its own unit, and a unit
    of frozen weights only gets no gradient buffer (`fsdp.decoder_layer_policy`).
    """

    compute_dtype: torch.dtype
    # The linear class's own attributes, declared for the type checker: this mixin reads them.
    in_features: int
    out_features: int
    weight: torch.Tensor
    bias: nn.Parameter  # None where the layer has no bias (torch declares it so)

    def forward(self, x: torch.Tensor, lora: LoraLinear | None = None) -> torch.Tensor:
        if lora is None:
            return self.frozen_forward(x)
        p = lora.lora_dropout.p if lora.training and isinstance(lora.lora_dropout, nn.Dropout) else 0.0
        recomputed = recomputing()
        reuse = lora.reuse_output_on_recompute and recomputed
        out = lora_linear(
            x.to(self.compute_dtype),
            lora.lora_A,
            lora.lora_B,
            self.bias,
            self.dense_weight,
            scaling=lora.scaling,
            dropout_p=p,
            base_output=not (reuse or (lora.skip_base_on_recompute and recomputed)),
        )
        out = out.to(x.dtype)
        # forward's value (as the no-gradient path below kept it); the gradient goes through the LoRA update above
        return output_from_forward(out) if reuse else out

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


#: Byte alignment of each tensor in a `PackedQuantWeight` blob, so that every part can be viewed in its own dtype.
PACK_ALIGNMENT = 16


class PackedQuantWeight:
    """The layout of one flat byte tensor holding a 4-bit weight and every tensor of its quantization state.

    Per-parameter sharding (FSDP2, `fsdp2.py`) splits each parameter along its first dimension and all-gathers
    it whole before the layer runs. Packed this way, a frozen 4-bit linear is one plain `uint8` parameter: it is
    sharded with its absmax (and double-quantization) constants, needs no tensor subclass, and is never cast by
    mixed precision (integers are not). The non-tensor fields (shape, dtype, blocksize, type) stay here.
    """

    def __init__(self, data: torch.Tensor, state: bnb_F.QuantState) -> None:
        self.state = state  # the template for the non-tensor fields
        self.parts: list[tuple[int, torch.dtype, torch.Size]] = []  # (byte offset, dtype, shape) of each tensor
        size = 0
        for t in self._tensors(data, state):
            self.parts.append((size, t.dtype, t.shape))
            size += -(-t.numel() * t.element_size() // PACK_ALIGNMENT) * PACK_ALIGNMENT
        self.size = size

    @staticmethod
    def _tensors(data: torch.Tensor, state: bnb_F.QuantState) -> list[torch.Tensor]:
        nested = [state.offset, state.state2.absmax, state.state2.code] if state.nested else []
        return [data, state.absmax, state.code, *nested]

    def pack(self, data: torch.Tensor, state: bnb_F.QuantState) -> torch.Tensor:
        """The weight and its state as one `uint8` tensor of `size` bytes."""
        flat = torch.zeros(self.size, dtype=torch.uint8, device=data.device)
        for (start, _, _), t in zip(self.parts, self._tensors(data, state), strict=True):
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
            flat[start : start + raw.numel()] = raw
        return flat

    def unpack(self, flat: torch.Tensor) -> tuple[torch.Tensor, bnb_F.QuantState]:
        """(packed weight, quantization state) as views of `flat`, as bitsandbytes' kernels take them."""
        views = []
        for start, dtype, shape in self.parts:
            nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
            views.append(flat[start : start + nbytes].view(dtype).view(shape))
        data, absmax, code, *nested = views
        s = self.state
        state2 = None
        if nested:
            offset, absmax2, code2 = nested
            state2 = bnb_F.QuantState(absmax2, code=code2, blocksize=s.state2.blocksize, dtype=s.state2.dtype)
        state = bnb_F.QuantState(
            absmax,
            shape=s.shape,
            code=code,
            blocksize=s.blocksize,
            quant_type=s.quant_type,
            dtype=s.dtype,
            offset=offset if nested else None,
            state2=state2,
        )
        return data, state


class FrozenLinear4bit(FrozenLinear, bnb.nn.Linear4bit):
    """A frozen bitsandbytes 4-bit linear layer (NF4/FP4) that also runs the fused LoRA path."""

    # bitsandbytes' own parameter class (`nn.Linear` declares a plain tensor); a plain byte parameter once packed
    weight: bnb.nn.Params4bit | nn.Parameter
    #: set by `pack_for_sharding`: `weight` is then one byte tensor holding the 4-bit weight and its state
    packing: PackedQuantWeight | None = None

    def weight_quant_state(self) -> bnb_F.QuantState:
        """The weight's quantization state. FSDP replaces the weight by a plain tensor of the packed bytes,
        which has none: then the copy kept on the module (`quant_state`, as bitsandbytes keeps it) serves."""
        state = getattr(self.weight, "quant_state", None)
        return state if state is not None else self.quant_state

    def quantized(self) -> tuple[torch.Tensor, bnb_F.QuantState]:
        """(packed 4-bit weight, quantization state), read from `weight` as it is now (under FSDP2: gathered)."""
        if self.packing is not None:
            return self.packing.unpack(self.weight)
        return self.weight.data, self.weight_quant_state()

    @torch.no_grad()
    def pack_for_sharding(self) -> None:
        """Make `weight` one frozen `uint8` parameter holding the 4-bit weight and its whole quantization state
        (`PackedQuantWeight`), for per-parameter sharding (`fsdp2.py`); the layer computes the same after."""
        data, state = self.quantized()
        self.packing = PackedQuantWeight(data, state)
        self.weight = nn.Parameter(self.packing.pack(data, state), requires_grad=False)
        self.quant_state = None

    def dense_weight(self) -> torch.Tensor:
        return bnb_F.dequantize_4bit(*self.quantized()).to(self.compute_dtype)

    @classmethod
    def empty(cls, in_features: int, out_features: int, *, bias: bool, quant: QuantSpec) -> FrozenLinear4bit:
        """The layer on the meta device, to be given its weight by `load_dense`. The one place where a
        `QuantSpec` becomes bitsandbytes' settings (quant_type, compress_statistics, quant_storage)."""
        if quant.quantize == "none":
            raise ValueError("FrozenLinear4bit needs quant.quantize 'nf4' or 'fp4'; 'none' keeps a FrozenLinear16bit")
        return cls(
            in_features,
            out_features,
            bias=bias,
            compute_dtype=torch_dtype(quant.compute_dtype),
            compress_statistics=quant.double_quant,
            quant_type=quant.quantize,
            quant_storage=torch_dtype(quant.quant_storage),
            device="meta",
        )

    def load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device | str) -> None:
        # Cast to the compute dtype first, as transformers' own 4-bit loading does, so both give the same bytes.
        spec = self.weight
        if not isinstance(spec, bnb.nn.Params4bit):
            raise RuntimeError("load_dense needs the layer as built: after pack_for_sharding its weight is bytes")
        self.weight = bnb.nn.Params4bit(  # type: ignore[misc]  # bitsandbytes annotates Params4bit.to as Module.to
            weight.detach().to(self.compute_dtype),
            requires_grad=False,
            blocksize=NF4_BLOCKSIZE,
            compress_statistics=spec.compress_statistics,
            quant_type=spec.quant_type,
            quant_storage=spec.quant_storage,
        ).to(device)
        self.quant_state = self.weight.quant_state  # kept on the module too, for when FSDP replaces the parameter
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(device, self.compute_dtype), requires_grad=False)

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        # bitsandbytes' kernels (a 4-bit GEMV for single tokens), called directly: `Linear4bit.forward`
        # would re-wrap a plain (FSDP) weight in a new parameter object behind FSDP's back.
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        data, state = self.quantized()
        out = bnb.matmul_4bit(x.to(self.compute_dtype), data.t(), bias=bias, quant_state=state)
        return out.to(x.dtype)


class FrozenLinear16bit(FrozenLinear, nn.Linear):
    """A frozen plain linear layer (the 16-bit LoRA baseline's base) that also runs the fused LoRA path."""

    @property
    def compute_dtype(self) -> torch.dtype:  # type: ignore[override]  # the 4-bit class stores it, this one reads it
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


def frozen_linear(
    in_features: int, out_features: int, *, bias: bool, quant: QuantSpec
) -> FrozenLinear4bit | FrozenLinear16bit:
    """The frozen base a `quant` setting asks for, on the meta device: 4-bit, or 16-bit with quantize 'none'."""
    if quant.quantize == "none":
        return FrozenLinear16bit(
            in_features, out_features, bias=bias, dtype=torch_dtype(quant.compute_dtype), device="meta"
        )
    return FrozenLinear4bit.empty(in_features, out_features, bias=bias, quant=quant)


def quantize_linear(
    weight: torch.Tensor, bias: torch.Tensor | None = None, *, device: torch.device | str, quant: QuantSpec
) -> FrozenLinear4bit:
    """A frozen 4-bit linear layer holding `weight` quantized on `device` as `quant` says (blocksize 64)."""
    out_features, in_features = weight.shape
    layer = FrozenLinear4bit.empty(in_features, out_features, bias=bias is not None, quant=quant)
    layer.load_dense(weight, bias, device)
    return layer


class LoraLinear(nn.Module):
    """A frozen base linear (`base_layer`: 4-bit, or 16-bit with `quant.quantize == "none"`) plus trainable
    `lora_A` (r × in) and `lora_B` (out × r), both in the compute dtype (bf16 in the paper).

    The attribute names follow PEFT (`base_layer`, `lora_A`, `lora_B`), so checkpoint keys map one-to-one onto
    PEFT's adapter format. Built on `device` ("meta" for a model that is given its tensors later, see
    `model.ModuleMaterializer`); `from_weight` builds one around a real weight.
    """

    base_layer: FrozenLinear4bit | FrozenLinear16bit
    #: True for a projection whose output only joins the residual stream (LLaMA's `mlp.down_proj`; set by
    #: `model.enable_gradient_checkpointing` for the families where that holds): when offloaded checkpointing
    #: recomputes the layer for its backward, nothing reads this output, so its frozen matmul (a fifth of the
    #: recomputation's GEMM work at 7B) is skipped then. Backward is unchanged.
    skip_base_on_recompute: bool = False
    #: True for a projection whose forward output waits in pinned host memory with its decoder layer's input (set by
    #: `model.enable_gradient_checkpointing` for `offload_outputs`): when offloaded checkpointing recomputes the
    #: layer, that value is taken back (`offload.output_from_forward`) and the frozen matmul is skipped, any
    #: projection alike. Backward is unchanged.
    reuse_output_on_recompute: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        lora: LoraSpec = LoraSpec(),
        quant: QuantSpec = QuantSpec(),
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha = lora.r, lora.alpha
        self.scaling = lora.alpha / lora.r
        self.base_layer = frozen_linear(in_features, out_features, bias=bias, quant=quant)
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        dtype = torch_dtype(quant.compute_dtype)
        self.lora_A = nn.Parameter(torch.empty(lora.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, lora.r, dtype=dtype, device=device))
        self.lora_dropout = nn.Dropout(lora.dropout) if lora.dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        lora: LoraSpec = LoraSpec(),
        quant: QuantSpec = QuantSpec(),
        device: torch.device | str | None = None,
    ) -> LoraLinear:
        """The layer around a dense (out × in) weight, quantized (or copied) on `device` (default: the weight's),
        with fresh adapters."""
        device = torch.device(device) if device is not None else weight.device
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, lora=lora, quant=quant, device="meta")
        layer.base_layer.load_dense(weight, bias, device)
        layer.materialize_lora(device)
        return layer

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

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen base's bias, as `nn.Linear.bias` (None for LLaMA's linears)."""
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.base_layer(x, lora=self)  # the fused training path, run by the base (see `FrozenLinear`)
        out = self.base_layer(x)
        if not self.reuse_output_on_recompute:
            return out.add_(lora_delta(x, self.lora_A, self.lora_B, self.lora_dropout, self.scaling).to(out.dtype))
        # Kept whole for the recomputation (when this is an offloaded layer's forward): the LoRA product goes into it
        # in its matmul, as in the training path
        out = lora_delta(x, self.lora_A, self.lora_B, self.lora_dropout, self.scaling, into=out)
        keep_output(out)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"


class LoraLinear4bit(LoraLinear):
    """The QLoRA layer: a frozen 4-bit base (NF4 with double quantization and bf16 compute by default) + LoRA.
    Arguments as `LoraLinear`; `quant.quantize` must be "nf4" or "fp4"."""

    def __init__(self, *args, quant: QuantSpec = QuantSpec(), **kwargs) -> None:
        if quant.quantize == "none":
            raise ValueError("LoraLinear4bit needs quant.quantize 'nf4' or 'fp4'; use LoraLinear16bit for 'none'")
        super().__init__(*args, quant=quant, **kwargs)


class LoraLinear16bit(LoraLinear):
    """The 16-bit twin of `LoraLinear4bit` (the paper's 16-bit LoRA baseline): the base stays a frozen linear in
    the compute dtype. Arguments as `LoraLinear`; `quant` only gives that dtype."""

    def __init__(self, *args, quant: QuantSpec = QuantSpec(quantize="none"), **kwargs) -> None:
        super().__init__(*args, quant=QuantSpec(quantize="none", compute_dtype=quant.compute_dtype), **kwargs)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """All LoRA layers of `model`, by module name (as `named_modules` gives it: a model FSDP wrapped has its
    wrappers' levels in them, which `fsdp.unwrapped_lora_layers` takes out)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
