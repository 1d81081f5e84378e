"""The fused LoRA autograd function: dropout on the LoRA input only, no dense weight saved for backward, the same mask
when recomputed, the frozen matmul left out of a recomputation with the same backward, FSDP's plain packed tensor, a
trainable bias refused (its formula: tests/test_lora.py)."""

import pytest
import torch
from qlora_testing import outputs_and_gradients, requires_cuda
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_lightning.lora import LoraLinear4bit, LoraLinear16bit
from qlora_lightning.lora_autograd import COMPILE_OPTIONS, lora_linear
from qlora_lightning.specs import LoraSpec, QuantSpec

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def make_layer(kind: str, device: str, dtype: torch.dtype, dropout: float, quant_storage="uint8"):
    torch.manual_seed(0)
    weight = torch.randn(48, 64) / 8
    cls = LoraLinear4bit if kind == "nf4" else LoraLinear16bit
    compute = str(dtype).removeprefix("torch.")
    quant = QuantSpec(quantize="nf4" if kind == "nf4" else "none", compute_dtype=compute, quant_storage=quant_storage)
    layer = cls.from_weight(weight, device=device, lora=LoraSpec(r=8, alpha=16, dropout=dropout), quant=quant)
    nn.init.normal_(layer.lora_B, std=0.1)  # a fresh B is zero, which would hide errors in grad A and grad x
    return layer.train()


def test_dropout_drops_the_lora_input_only():
    """With p near 1 the LoRA path vanishes (its input is almost all dropped) but the base output stays."""
    layer = make_layer("nf4", "cpu", torch.float32, 0.1)
    x = torch.randn(4, 64)
    with torch.no_grad():
        base = layer.base_layer(x)
    out = lora_linear(
        x, layer.lora_A, layer.lora_B, None, layer.base_layer.dense_weight, scaling=layer.scaling, dropout_p=0.999999
    )
    assert torch.allclose(out, base, atol=1e-5)
    no_drop = lora_linear(
        x, layer.lora_A, layer.lora_B, None, layer.base_layer.dense_weight, scaling=layer.scaling, dropout_p=0.0
    )
    assert not torch.allclose(no_drop, base, atol=1e-3)


def test_the_dense_weight_is_never_saved_for_backward():
    layer = make_layer("nf4", "cpu", torch.float32, 0.1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        layer(torch.randn(4, 64, requires_grad=True)).sum().backward()
    assert saved and (48, 64) not in saved, saved


def test_under_checkpointing_the_recomputed_dropout_mask_is_the_same():
    layer = make_layer("nf4", "cpu", torch.float32, 0.3)
    x = torch.randn(6, 64)
    direct = outputs_and_gradients(layer, layer, x)
    recomputed = outputs_and_gradients(layer, lambda t: checkpoint(layer, t, use_reentrant=False), x)
    for a, b in zip(direct, recomputed, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_without_the_base_output_forward_skips_the_frozen_matmul_and_backward_is_the_same(dropout):
    """`base_output=False` (a recomputation whose output nobody reads): the LoRA update alone out, the weight
    dequantized only for backward, and the same gradients for x, A and B as the full forward given the same output
    gradient."""
    layer = make_layer("nf4", "cpu", torch.float32, dropout)
    calls = []
    weight = layer.base_layer.dense_weight

    def counted() -> torch.Tensor:
        calls.append(1)
        return weight()

    x = torch.randn(2, 5, 64)
    grad_out = torch.randn(2, 5, 48)
    results = []
    for base_output in (True, False):
        calls.clear()
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)  # the same dropout mask in both
        args = (xi, layer.lora_A, layer.lora_B, None, counted)
        out = lora_linear(*args, scaling=layer.scaling, dropout_p=dropout, base_output=base_output)
        forward_calls = len(calls)
        grads = torch.autograd.grad(out, (xi, layer.lora_A, layer.lora_B), grad_out)
        results.append((out.detach(), forward_calls, grads))
    (full, full_calls, full_grads), (skipped, skipped_calls, skipped_grads) = results
    assert full_calls == 1 and skipped_calls == 0
    base = torch.nn.functional.linear(x, weight())
    torch.testing.assert_close(skipped, full - base)  # the LoRA update: the full output without the frozen matmul
    assert skipped.abs().sum() > 0
    for a, b in zip(full_grads, skipped_grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_compiled_the_lora_product_is_added_into_the_base_matmul_s_own_buffer(device, dropout):
    """Compiled forward and backward call no out-of-place `addmm` (each copies the tensor it adds to into a new
    buffer first: 192 copies of a projection's output a 7B step) but `lora_autograd.accumulate_product`, once in
    forward and once in backward, with the eager outputs and gradients. Written as `addmm_`/`addcmul_`, Inductor's
    code had `extern_kernels.addmm(..., out=...)` in forward (CPU and CUDA) and, with dropout, in backward (CUDA)."""
    from torch._inductor.utils import run_and_get_code

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    layer = make_layer("nf4", device, dtype, dropout)
    x = torch.randn(2, 5, 64, device=device, dtype=dtype)
    compiled = torch.compile(layer, options=COMPILE_OPTIONS)
    eager = outputs_and_gradients(layer, layer, x)
    results, sources = run_and_get_code(lambda: outputs_and_gradients(layer, compiled, x))
    torch._dynamo.reset()
    calls = [line for source in sources for line in source.splitlines() if "addmm" in line or "accumulate" in line]
    assert calls and not any("extern_kernels.addmm" in line for line in calls), calls
    assert sum("qlora_lightning.accumulate_product.default(" in line for line in calls) == 2, calls
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(eager, results, strict=True):
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_a_plain_packed_tensor_with_the_quant_state_on_the_module_works(device):
    """What FSDP does: the packed bytes (bf16 storage, as FSDP needs) become a plain parameter."""
    layer = make_layer("nf4", device, torch.bfloat16, 0.0, quant_storage="bfloat16")
    x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    before = outputs_and_gradients(layer, layer, x)
    layer.base_layer.weight = nn.Parameter(layer.base_layer.weight.data.clone(), requires_grad=False)
    assert getattr(layer.base_layer.weight, "quant_state", None) is None
    after = outputs_and_gradients(layer, layer, x)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


def test_a_trainable_base_bias_is_refused():
    layer = make_layer("16bit", "cpu", torch.float32, 0.0)
    bias = nn.Parameter(torch.zeros(48))
    with pytest.raises(ValueError, match="bias must be frozen"):
        lora_linear(
            torch.randn(2, 64),
            layer.lora_A,
            layer.lora_B,
            bias,
            layer.base_layer.dense_weight,
            scaling=1.0,
            dropout_p=0.0,
        )
