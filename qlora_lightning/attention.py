"""Attention for packed (padding-free) rows without a dense mask: variable-length attention, registered with
transformers under the name `ATTENTION`.

A packed row holds a micro-batch's examples end to end (`data.padding_free`). transformers' `sdpa` attention
would build a (tokens × tokens) block-diagonal mask for it and compute every block of it, the masked ones too,
which made packing slower than padding. Here the row comes with its examples' boundaries as cumulative sequence
lengths (`cu_seq_lens_q`, `max_length_q`, the names transformers passes through every model to its attention
functions; `data.tokenize.InstructionCollator` writes them), and attention runs over each example alone:
- on CUDA with torch's `varlen_attn` (FlashAttention's variable-length kernel, in torch since 2.10), causal
  within each example and nothing across examples;
- elsewhere (the CPU of tests and the demo) one causal `scaled_dot_product_attention` per example: the same
  arithmetic as a padded row's, which the tests compare it with.
A batch without boundaries (padded rows, generation) goes to transformers' own `sdpa` attention unchanged, and
the mask function builds no mask for a row that has no `attention_mask`, so one model serves both layouts.

`use_varlen_attention(model)` switches a model over; models whose attention is not `sdpa` (eager for
soft-capping, say) are left as they are, and transformers' own packed path serves them.
"""

from __future__ import annotations

import inspect
from itertools import pairwise

import torch
from torch.nn import functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["ATTENTION", "varlen_attention", "use_varlen_attention"]

#: The attention implementation's name in transformers' registries.
ATTENTION = "qlora_varlen"


def _cuda_varlen_attn():
    """torch's `varlen_attn` and whether it takes `enable_gqa` (torch 2.13 does; 2.11 does not), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


# Not traced by dynamo: traced (compiled layers with offloaded checkpointing), its loop over the row's boundaries
# specialised the graph on them, so every new packed row recompiled it until dynamo's recompile limit (torch 2.13).
@torch.compiler.disable
def _per_example(q, k, v, bounds: list[int], scaling: float | None, groups: int) -> torch.Tensor:
    """(tokens, heads, dim) attention of each example alone, causal: the fallback off CUDA."""
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = torch.empty_like(q)
    for start, end in pairwise(bounds):
        if end > start:
            q_, k_, v_ = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))
            out[start:end] = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scaling)[0].transpose(
                0, 1
            )
    return out


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query (1, heads, tokens, dim), key/value (1, kv heads, tokens,
    dim) → (1, tokens, heads, dim). With `cu_seq_lens_q` each example of the packed row attends to itself only;
    without it, transformers' `sdpa` attention runs as it would have.

    `max_length_q` may exceed the longest example (the data module passes its length limit, the same every
    step, so that compiled layers see one constant); sliding windows are honoured; soft-capping, attention
    dropout and float32 on CUDA (the kernel takes 16-bit floats only) are not supported and raise.
    """
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one row of concatenated examples, got a batch of {query.shape[0]}")
    if dropout or kwargs.get("softcap") is not None:
        raise ValueError(
            f"{type(module).__name__}: packed rows do not support attention dropout or soft-capping; set "
            "data.padding_free false for this model"
        )
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (tokens, heads, dim)
    groups = q.shape[1] // k.shape[1]
    window = kwargs.get("sliding_window")
    found = _cuda_varlen_attn() if q.is_cuda else None
    if found is None:
        if window is not None:
            raise ValueError("sliding-window attention over packed rows needs CUDA (torch's varlen_attn)")
        out = _per_example(q, k, v, cu_seq_lens_q.tolist(), scaling, groups)
    else:
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"packed rows on CUDA run through torch's varlen_attn, which takes float16 or bfloat16, not {q.dtype}: "
                "set model.quant.compute_dtype bfloat16 (the recipe's) or data.padding_free false"
            )
        varlen_attn, takes_gqa = found
        if groups > 1 and not takes_gqa:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        extra = {"enable_gqa": True} if groups > 1 and takes_gqa else {}
        bounds = cu_seq_lens_q.to(torch.int32)
        longest = int(max_length_q) if max_length_q is not None else int((bounds[1:] - bounds[:-1]).max())
        out = varlen_attn(
            q, k, v, bounds, bounds, longest, longest, scale=scaling,
            window_size=(window - 1 if window else -1, 0), **extra,
        )  # fmt: skip
    return out[None], None


def _mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask where a row has no `attention_mask` (a packed row: its boundaries go to `varlen_attention`; or one
    unpadded sequence: causal); else `sdpa`'s mask. A sliding-window layer (`local_size`, transformers' argument for
    it) always gets `sdpa`'s mask (none while the row fits the window): without one, an unpadded sequence longer
    than the window would attend past it (Gemma 3 called without an attention mask)."""
    if attention_mask is None and kwargs.get("local_size") is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)  # type: ignore[misc]  # mypy cannot count `args`


def use_varlen_attention(model: PreTrainedModel) -> bool:
    """Run `model`'s attention through `varlen_attention` if it runs through `sdpa` now; whether it switched."""
    if model.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(ATTENTION, varlen_attention)
    AttentionMaskInterface.register(ATTENTION, _mask)
    model.config._attn_implementation = ATTENTION
    return True
