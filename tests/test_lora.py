"""LoraLinear4bit / LoraLinear16bit on CPU (and CUDA when present)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes import functional as bnb_F
from qlora_testing import outputs_and_gradients, requires_cuda
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


def test_16bit_twin_matches_plain_linear_when_fresh():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16, dtype=torch.bfloat16)
    layer = LoraLinear16bit.from_weight(linear.weight, linear.bias, lora=LoraSpec(r=4))
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(layer.eval()(x), linear(x), rtol=0, atol=0)


def frozen_weight(layer) -> torch.Tensor:
    """The layer's frozen W as a plain tensor (the 4-bit one dequantized by bitsandbytes itself)."""
    w = layer.base_layer.weight
    return bnb_F.dequantize_4bit(w.data, w.quant_state) if isinstance(layer, LoraLinear4bit) else w.detach()


def textbook(layer, x: torch.Tensor, p: float) -> torch.Tensor:
    """`W x + b + s·B A drop(x)` as written, under plain autograd (the dropout mask drawn as the layer draws it)."""
    w, b = frozen_weight(layer).to(x.dtype), layer.base_layer.bias.to(x.dtype)
    dropped = torch.native_dropout(x, p, True)[0] if p > 0 else x
    update = (dropped.to(layer.lora_A.dtype) @ layer.lora_A.t() @ layer.lora_B.t()) * layer.scaling
    return x @ w.t() + b + update.to(x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [LoraLinear4bit, LoraLinear16bit])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_the_layer_computes_w_x_plus_scaled_b_a_x(device, cls, dtype, tol, p):
    """The LoRA formula, once for both layers: the training forward (fused, in-place add, scale folded into B) and
    its gradients of x, A and B against the textbook composition, with and without dropout; in eval mode the
    output against the merged weight `W + s·B A` that adapters.delta_weight gives the export."""
    torch.manual_seed(0)
    quant = QuantSpec(quantize="nf4" if cls is LoraLinear4bit else "none", compute_dtype=str(dtype)[6:])
    lora = LoraSpec(r=8, alpha=16, dropout=p)
    layer = cls.from_weight(torch.randn(48, 64) / 8, torch.randn(48) / 10, device=device, lora=lora, quant=quant)
    nn.init.normal_(layer.lora_B, std=0.1)  # a fresh B is zero, which would hide errors in grad A and grad x
    assert layer.scaling == 16 / 8
    x = torch.randn(3, 5, 64, device=device, dtype=dtype)
    got = outputs_and_gradients(layer.train(), layer, x)
    want = outputs_and_gradients(layer, lambda t: textbook(layer, t, p), x)
    for name, a, b in zip(["output", "grad x", "grad A", "grad B"], got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        err = (a.float() - b.float()).norm() / b.float().norm()
        assert err < tol, f"{name}: relative error {err:.2e}"

    merged = frozen_weight(layer).float() + delta_weight(layer.lora_A, layer.lora_B, layer.scaling)
    with torch.no_grad():
        out, expected = layer.eval()(x).float(), nn.functional.linear(x.float(), merged, layer.bias.float())
    assert (out - expected).norm() / expected.norm() < max(tol, 1e-4)  # eval runs bitsandbytes' own kernels


@pytest.mark.parametrize("device", DEVICES)
def test_a_kept_output_gets_the_lora_product_in_its_matmul_compiled(device):
    """Without gradients (an offloaded layer's forward), a layer whose output is kept whole for the recomputation
    (`reuse_output_on_recompute`) adds the LoRA product into that output in the matmul (`accumulate_product`): no
    activation-sized delta written and added back in a kernel of its own. The output is the plain layer's; a layer
    that keeps nothing leaves the add to the compiler, which fuses it into the consumer."""
    from torch._inductor.utils import run_and_get_code

    from qlora_lightning.lora_autograd import COMPILE_OPTIONS

    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    quant = QuantSpec(compute_dtype=str(dtype)[6:])
    layer = LoraLinear4bit.from_weight(torch.randn(48, 64) / 8, device=device, lora=LoraSpec(r=8), quant=quant).eval()
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(3, 5, 64, device=device, dtype=dtype)
    calls = {}
    with torch.no_grad():
        plain = layer(x)
        for kept in (False, True):
            layer.reuse_output_on_recompute = kept
            compiled = torch.compile(lambda t: layer(t) * 2, options=COMPILE_OPTIONS)  # a consumer to fuse into
            out, sources = run_and_get_code(compiled, x)
            torch._dynamo.reset()
            torch.testing.assert_close(out, plain * 2, rtol=1e-5 if device == "cpu" else 2e-2, atol=1e-5)
            calls[kept] = sum(source.count("qlora_lightning.accumulate_product.default(") for source in sources)
    assert calls == {False: 0, True: 1}


def test_a_weight_packed_for_sharding_cannot_be_loaded_again_as_dense():
    """After `pack_for_sharding` the 4-bit layer's weight is one byte tensor with its quantization state inside:
    `load_dense` (which needs bitsandbytes' parameter as built) says so instead of quantizing into the wrong layout."""
    layer = LoraLinear4bit.from_weight(torch.randn(64, 32, dtype=torch.bfloat16), device="cpu")
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    before = layer.base_layer(x)
    layer.base_layer.pack_for_sharding()
    assert layer.base_layer.weight.dtype == torch.uint8 and torch.equal(layer.base_layer(x), before)  # same layer
    with pytest.raises(RuntimeError, match="load_dense needs the layer as built: after pack_for_sharding"):
        layer.base_layer.load_dense(torch.randn(64, 32), None, "cpu")
