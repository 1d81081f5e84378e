"""The training path of a LoRA layer as one autograd function: frozen base matmul and LoRA update fused.

    y = x Wᵀ + b + (drop(x) Aᵀ)(s B)ᵀ          W frozen (4-bit or dense), A (r × in) and B (out × r) trained

Composing the same thing from bitsandbytes' `matmul_4bit`, `nn.Dropout` and two matmuls under autograd
writes and reads more activation-sized tensors than the math needs. Here:
- the LoRA product is accumulated into the base output in the matmul itself (`addmm_`): no
  activation-sized delta, no separate add;
- dropout is one `native_dropout` call that returns the mask; backward applies the mask to the LoRA
  input-gradient and accumulates the frozen path's into it in the matmul: no gradient accumulation pass;
- compiled, both accumulations run as an opaque in-place op (`accumulate_product`): Inductor would otherwise write
  each as an out-of-place `addmm`, which copies the output it adds to first;
- the frozen weight is materialised (dequantized, for 4-bit) once in forward and once in backward, into
  a temporary freed at once, and never saved: under activation checkpointing a saved copy would stay
  alive for the layer's whole backward, and without checkpointing it would keep a dense model in memory;
- saved for backward: the dropped input (for grad A), its mask (for grad x), the rank-sized `drop(x) Aᵀ`
  (for grad B) and the small A and s·B;
- compiled (`torch.compile` with `COMPILE_OPTIONS`), the dequantization is kept out of what forward saves as
  well: AOTAutograd's partitioner would otherwise compute backward's dequantization in forward (it depends on
  the frozen weights alone) and save it, as it saves every custom op's output it cannot recompute, so a compiled
  layer held its dense weights from its forward to its backward (`DequantizeInBackward`);
- `base_output=False` leaves the frozen matmul out of forward and returns the LoRA update alone: for a
  recomputation under activation checkpointing whose output nobody reads (see `offload.recomputing`). What is
  saved, and so backward, is the same. Not zeros: an output that depends on the input keeps what feeds it in
  forward's graph when compiled (with zeros Inductor's partitioner moved a LLaMA MLP's whole forward into the
  backward graph, where its temporaries raised the peak).

The plain composition stays the reference in tests (`tests/test_lora_autograd.py`), and inference
(no gradient) keeps bitsandbytes' own kernels, which have a fast 4-bit GEMV for single tokens.
`torch.compile` traces through this function (its dequantization is a registered bitsandbytes op), so
a compiled decoder layer is one graph; its dropout runs torch's own kernel inside it (`COMPILE_OPTIONS`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes, which DequantizeInBackward looks for)
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.nn import functional as F
from torch.utils.checkpoint import CheckpointPolicy


@torch.library.custom_op("qlora_lightning::accumulate_product", mutates_args=("out",))
def _accumulate_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`out += a @ b` in place, as an op that Inductor keeps opaque. Written plainly (`out.addmm_(a, b)`), Inductor
    makes `mm` + `addmm_` an out-of-place `addmm` into a new buffer, which cuBLAS runs as a copy of `out` and then an
    accumulating matmul: at 7B 16 × 512, 192 copies of a projection's output a step in the recomputation, 9.4 ms of
    650 on an H200. Declared as mutating `out`, it is called on the matmul's own buffer, with no copy: 1.0 % more
    tokens/s at 7B, and with backward's accumulation written this way too 0.2 GiB less peak (BENCHMARKS.md)."""
    out.addmm_(a, b)


@_accumulate_product.register_fake
def _(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    return None


def accumulate_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`out += a @ b` in place; `out`. Compiled, through the opaque op above; eager, `addmm_` itself (the op's
    dispatch costs a few microseconds a call, and eager has no copy to avoid)."""
    if torch.compiler.is_compiling():
        _accumulate_product(out, a, b)
        return out
    return out.addmm_(a, b)


class _LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        bias: torch.Tensor | None,
        dense_weight: Callable[[], torch.Tensor],
        scaling: float,
        dropout_p: float,
        base_output: bool,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if dropout_p > 0:
            x_drop, mask = torch.native_dropout(x2, dropout_p, True)
        else:
            x_drop, mask = x2, None
        a = lora_A.to(x.dtype)
        scaled_b = (lora_B * scaling).to(x.dtype)
        h = x_drop @ a.t()
        ctx.save_for_backward(x_drop, mask, h, a, scaled_b)
        ctx.dense_weight, ctx.scaling, ctx.dropout_p = dense_weight, scaling, dropout_p
        ctx.param_dtypes = (lora_A.dtype, lora_B.dtype)
        if base_output:
            out = accumulate_product(F.linear(x2, dense_weight(), bias), h, scaled_b.t())
        else:
            out = h @ scaled_b.t()
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_drop, mask, h, a, scaled_b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_h = g @ scaled_b
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ a  # the LoRA path's, through the dropout; the frozen path's added in place
            if mask is not None:
                grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - ctx.dropout_p))
            accumulate_product(grad_x, g, ctx.dense_weight())
            grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_a = (grad_h.t() @ x_drop).to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_b = ((g.t() @ h) * ctx.scaling).to(ctx.param_dtypes[1])
        return grad_x, grad_a, grad_b, None, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    dense_weight: Callable[[], torch.Tensor],
    *,
    scaling: float,
    dropout_p: float,
    base_output: bool = True,
) -> torch.Tensor:
    """`x Wᵀ + b + (drop(x) Aᵀ)(s B)ᵀ` with a hand-written backward (see the module docstring).

    `dense_weight()` returns the frozen (out × in) weight in `x`'s dtype; it is called once in forward
    and once in backward, so a 4-bit layer passes its dequantization. `dropout_p` is the LoRA dropout
    probability in training (0 for none). The frozen weight and bias get no gradient. `base_output=False`
    returns the LoRA update alone, with the same backward: only for a recomputation whose output is never read.
    """
    if bias is not None and bias.requires_grad:
        raise ValueError("lora_linear trains only the LoRA factors; the base bias must be frozen")
    return _LoraLinearFunction.apply(x, lora_A, lora_B, bias, dense_weight, scaling, dropout_p, base_output)


class DequantizeInBackward(CustomGraphPass):
    """An Inductor joint-graph pass that marks bitsandbytes' 4-bit dequantizations "must recompute" (the mark
    selective activation checkpointing gives), so that the partitioner redoes each in backward, right before its
    matmul, instead of saving forward's (see the module docstring). Each is a dense (out × in) copy of a frozen
    weight in the compute dtype: 0.38 GiB per 7B layer that a compiled layer kept from its forward to its
    backward, every layer's at once without activation checkpointing."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.bitsandbytes.dequantize_4bit.default:
                node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE

    def uuid(self) -> Any:  # Inductor's compiled-graph cache keys on it: change it when the pass changes
        return "qlora_lightning.DequantizeInBackward.1"


#: `torch.compile(..., options=COMPILE_OPTIONS)` for anything that runs `lora_linear` compiled and trains.
#: - `joint_custom_pre_pass`: dense weights recomputed in backward, never saved (`DequantizeInBackward`).
#: - `fallback_random`: the LoRA dropout runs torch's own `native_dropout` kernel instead of Inductor's generated
#:   random numbers. Inductor's Triton code draws one Philox result per element and discards the other three, so
#:   the fused kernels holding the masks (seven projections' inputs a layer, drawn again in the recomputation)
#:   were bound by random-number arithmetic: at 7B, 119 ms of compiled elementwise kernels a 16 × 512 step, 54 ms
#:   plus 38 ms of torch's dropout kernels with this option, 3 % more tokens/s at fixed length and 5 % packed at the
#:   same peak (H200, BENCHMARKS.md). The masks are then the ones eager layers draw from the same seed.
COMPILE_OPTIONS: dict[str, Any] = {"joint_custom_pre_pass": DequantizeInBackward(), "fallback_random": True}
