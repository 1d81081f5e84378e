"""LoraLinear4bit / LoraLinear16bit on CPU (and CUDA when present)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes import functional as bnb_F
from qlora_testing import requires_cuda
from torch import nn

from qlora_lightning.adapters import delta_weight
from qlora_lightning.lora import LoraLinear4bit, LoraLinear16bit
from qlora_lightning.specs import LoraSpec, QuantSpec

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def reference_linear4bit(weight: torch.Tensor, device: str, quant_type="nf4") -> bnb.nn.Linear4bit:
    ref = bnb.nn.Linear4bit(
        weight.shape[1],
        weight.shape[0],
        bias=False,
        compute_dtype=torch.bfloat16,
        compress_statistics=True,
        quant_type=quant_type,
    )
    ref.weight = bnb.nn.Params4bit(
        weight.to(torch.bfloat16), requires_grad=False, compress_statistics=True, quant_type=quant_type, blocksize=64
    ).to(device)
    return ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fresh_layer_equals_bnb_linear4bit_bit_for_bit(device, quant_type):
    torch.manual_seed(0)
    weight = torch.randn(96, 128) * 0.02
    layer = LoraLinear4bit.from_weight(
        weight, device=device, lora=LoraSpec(r=8, alpha=16, dropout=0.1), quant=QuantSpec(quantize=quant_type)
    ).eval()
    ref = reference_linear4bit(weight, device, quant_type)
    x = torch.randn(3, 5, 128, device=device, dtype=torch.bfloat16)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    with torch.no_grad():  # inference runs bitsandbytes' own kernels: bit for bit
        torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)
    layer.train()  # dropout on the LoRA input changes nothing while B = 0
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)
    # Training runs the fused function: the same product, up to the GEMM kernel's bf16 summation order on CUDA.
    out, expected = layer(x).detach(), ref(x)
    if device == "cpu":
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    else:
        assert (out.float() - expected.float()).norm() / expected.float().norm() < 1e-2


def test_nf4_round_trip_error_is_the_expected_bound():
    torch.manual_seed(0)
    weight = torch.randn(512, 512)
    layer = LoraLinear4bit.from_weight(weight, lora=LoraSpec(r=4))
    err = (layer.base_layer.dense_weight().float() - weight).norm() / weight.norm()
    # NF4 with blocksize 64 on Gaussian weights: ≈ 0.092 relative (measured here); bf16 input adds little.
    assert 0.08 < err < 0.10, err
    fp4 = LoraLinear4bit.from_weight(weight, lora=LoraSpec(r=4), quant=QuantSpec(quantize="fp4"))
    err_fp4 = (fp4.base_layer.dense_weight().float() - weight).norm() / weight.norm()
    assert err < err_fp4 < 0.14  # NF4 is the better 4-bit type for normal weights (paper, Table 2)


def test_lora_forward_is_base_plus_scaled_update():
    torch.manual_seed(0)
    layer = LoraLinear4bit.from_weight(torch.randn(32, 48) * 0.05, lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 48, dtype=torch.bfloat16)
    expected = layer.base_layer(x).float() + (x.float() @ layer.lora_A.float().t() @ layer.lora_B.float().t()) * 2.0
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2)


def test_lora_init_is_peft_kaiming_uniform():
    torch.manual_seed(0)
    layer = LoraLinear4bit(1024, 16, lora=LoraSpec(r=64), device="cpu")
    bound = (6 / ((1 + 5) * 1024)) ** 0.5  # kaiming_uniform with a=sqrt(5): gain² = 2/(1+a²)
    assert layer.lora_A.abs().max() <= bound * 1.01 and layer.lora_A.abs().max() > bound * 0.9
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    assert layer.scaling == 16 / 64


@pytest.mark.parametrize("device", DEVICES)
def test_only_lora_gets_gradients_and_4bit_weight_never_changes(device):
    torch.manual_seed(0)
    layer = LoraLinear4bit.from_weight(
        torch.randn(64, 64) * 0.05, torch.randn(64) * 0.1, device=device, lora=LoraSpec(r=8)
    )
    packed = layer.base_layer.weight.data.clone()
    absmax = layer.base_layer.weight.quant_state.absmax.clone()
    bias = layer.base_layer.bias.detach().clone()
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A", "lora_B"]
    opt = bnb.optim.AdamW32bit([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        x = torch.randn(4, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        layer(x).float().pow(2).mean().backward()
        assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
        assert x.grad is not None  # gradients still flow through the frozen base to earlier layers
        opt.step()
        opt.zero_grad()
    assert torch.count_nonzero(layer.lora_B) > 0
    assert torch.equal(layer.base_layer.weight.data, packed)
    assert torch.equal(layer.base_layer.weight.quant_state.absmax, absmax)
    assert torch.equal(layer.base_layer.bias, bias)


@pytest.mark.parametrize("cls", [LoraLinear4bit, LoraLinear16bit])
def test_merged_weight_reproduces_the_layer(cls):
    torch.manual_seed(0)
    layer = cls.from_weight(torch.randn(48, 64) * 0.05, torch.randn(48) * 0.1, lora=LoraSpec(r=8, alpha=16)).eval()
    nn.init.normal_(layer.lora_B, std=0.05)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    merged_weight = layer.base_layer.dense_weight().float() + delta_weight(layer.lora_A, layer.lora_B, layer.scaling)
    merged = nn.functional.linear(x.float(), merged_weight, layer.bias.float())
    out = layer(x).float()
    assert (out - merged).norm() / merged.norm() < 1e-2  # bf16 activations: ~3 significant digits


def test_16bit_twin_matches_plain_linear_when_fresh():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16, dtype=torch.bfloat16)
    layer = LoraLinear16bit.from_weight(linear.weight, linear.bias, lora=LoraSpec(r=4))
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(layer.eval()(x), linear(x), rtol=0, atol=0)


@requires_cuda
def test_cuda_matmul_matches_dequantized_reference():
    torch.manual_seed(0)
    layer = LoraLinear4bit.from_weight(torch.randn(256, 512) * 0.02, device="cuda", lora=LoraSpec(r=16)).eval()
    nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    w = bnb_F.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
    ref = x.float() @ (w + delta_weight(layer.lora_A, layer.lora_B, layer.scaling)).t()
    assert (layer(x).float() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_and_gradients_match_the_unfused_reference(device, dtype):
    """The layer's forward (in-place add, scale folded into B) against the textbook formula."""
    torch.manual_seed(0)
    compute = "bfloat16" if dtype == torch.bfloat16 else "float32"
    layer = LoraLinear4bit.from_weight(
        torch.randn(64, 96) * 0.05,
        device=device,
        lora=LoraSpec(r=8, alpha=16, dropout=0.0),
        quant=QuantSpec(compute_dtype=compute),
    )
    nn.init.normal_(layer.lora_B, std=0.05)
    x = torch.randn(3, 7, 96, device=device, dtype=dtype, requires_grad=True)
    out = layer(x)
    out.float().square().sum().backward()
    got = (out.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())

    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    w = bnb_F.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).to(dtype)
    ref = x @ w.t() + (x @ layer.lora_A.t() @ layer.lora_B.t()) * layer.scaling
    ref.float().square().sum().backward()
    want = (ref.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for g, w_ in zip(got, want):
        assert (g.float() - w_.float()).norm() / w_.float().norm() < tol
