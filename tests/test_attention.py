"""Packed attention (`attention.py`): padded batches exactly as transformers' sdpa, packed rows with boundaries as
their padded twins (CPU per-example fallback; CUDA varlen kernel), models on other attention left alone."""

from __future__ import annotations

import pytest
import torch
from qlora_testing import requires_cuda, tiny_llama

from qlora_lightning.attention import ATTENTION, use_varlen_attention
from qlora_lightning.data.tokenize import sequence_boundaries

LENGTHS = [5, 9, 3, 12]


def examples(device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=g).to(device) for n in LENGTHS]


def padded(model, rows: list[torch.Tensor]) -> torch.Tensor:
    """Each example's logits from a right-padded batch, concatenated in order."""
    width = max(len(x) for x in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(rows):
        ids[i, : len(x)], mask[i, : len(x)] = x, 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return torch.cat([logits[i, : len(x)] for i, x in enumerate(rows)])


def packed(model, rows: list[torch.Tensor], *, boundaries: bool = True, max_length: int | None = None) -> torch.Tensor:
    """The logits of the examples end to end in one row, positions restarting at 0 for each."""
    ids = torch.cat(rows)[None]
    positions = torch.cat([torch.arange(len(x), device=ids.device) for x in rows])[None]
    extra = {}
    if boundaries:
        cu = sequence_boundaries([len(x) for x in rows]).to(ids.device)
        longest = max_length or max(len(x) for x in rows)
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return model(input_ids=ids, position_ids=positions, use_cache=False, **extra).logits[0]


def test_padded_batches_are_computed_exactly_as_by_sdpa():
    model = tiny_llama()
    rows = examples("cpu")
    with torch.no_grad():
        before = padded(model, rows)
        assert use_varlen_attention(model) and model.config._attn_implementation == ATTENTION
        assert torch.equal(padded(model, rows), before)


def test_packed_rows_with_boundaries_give_the_padded_logits_and_gradients_on_the_cpu():
    model = tiny_llama()
    use_varlen_attention(model)
    rows = examples("cpu")
    results = []
    for run in (padded, packed):
        model.zero_grad()
        logits = run(model, rows)
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (ref, ref_grads), (out, out_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(ref_grads, out_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_a_model_on_another_attention_is_left_alone():
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    assert not use_varlen_attention(model)
    assert model.config._attn_implementation == "eager"


def test_packed_rows_refuse_what_the_kernel_cannot_do():
    model = tiny_llama()
    use_varlen_attention(model)
    model.config.sliding_window = 4  # read by attention modules that pass sliding_window on (Mistral, Qwen2)
    attention = model.model.layers[0].self_attn
    q = k = v = torch.zeros(1, 4, 6, 16)
    cu = sequence_boundaries([6])
    with pytest.raises(ValueError, match="sliding-window attention over packed rows needs CUDA"):
        from qlora_lightning.attention import varlen_attention

        varlen_attention(attention, q, k, v, None, cu_seq_lens_q=cu, max_length_q=6, sliding_window=4)
    with pytest.raises(ValueError, match="padding_free false"):
        varlen_attention(attention, q, k, v, None, cu_seq_lens_q=cu, max_length_q=6, softcap=30.0)


@requires_cuda
@pytest.mark.parametrize("max_length", [None, 512])
def test_on_cuda_the_varlen_kernel_gives_the_padded_logits_and_gradients(max_length):
    """torch's varlen_attn (bf16) against padded sdpa; `max_length` above the longest example (the data module's
    constant bound) changes nothing."""
    model = tiny_llama().to("cuda", torch.bfloat16)
    use_varlen_attention(model)
    rows = examples("cuda")
    results = []
    for run in (padded, lambda m, r: packed(m, r, max_length=max_length)):
        model.zero_grad()
        logits = run(model, rows).float()
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad.float() for p in model.parameters()]))
    (ref, ref_grads), (out, out_grads) = results
    assert (out - ref).norm() <= 2e-2 * ref.norm()
    for a, b in zip(ref_grads, out_grads, strict=True):
        assert (b - a).norm() <= 5e-2 * a.norm() + 1e-6


@requires_cuda
def test_on_cuda_float32_packed_rows_are_refused_by_name():
    """varlen_attn takes 16-bit floats only: a float32 packed row says which setting to change."""
    model = tiny_llama().to("cuda")
    use_varlen_attention(model)
    with pytest.raises(ValueError, match="compute_dtype bfloat16"):
        packed(model, examples("cuda"))
