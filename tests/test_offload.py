"""Offloaded activation checkpointing: the same loss and gradients as plain checkpointing, dropout included; less
GPU memory held between forward and backward; the recomputation skips the frozen matmul of the projections whose
output only joins the residual, and of those whose output it takes back from forward (`offload_outputs`); nothing
left behind by a forward without backward."""

from __future__ import annotations

import gc

import pytest
import torch
from qlora_testing import randomize_adapters, requires_cuda, saved_for_backward, tiny_module_and_data

from qlora_lightning import QLoRAModule
from qlora_lightning.lora import lora_layers
from qlora_lightning.model import load_model
from qlora_lightning.offload import _copies
from qlora_lightning.specs import LoraSpec, QuantSpec

#: Every attention projection and the MLP's gate and up: each kind of consumer (RoPE, attention, the residual, SwiGLU)
ALL_BUT_DOWN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


def loss_and_grads(
    base, *, offload: bool, dropout: float, device: str = "cpu", seq: int = 12, outputs=(), compiled: bool = False
):
    dtype = "float32" if device == "cpu" else "bfloat16"
    module = QLoRAModule(
        str(base),
        quant=QuantSpec(compute_dtype=dtype),
        lora=LoraSpec(r=8, dropout=dropout),
        offload_activations=offload,
        offload_outputs=outputs,
        compile_layers=compiled,
    )
    module.to(device).configure_model()
    randomize_adapters(module.model, seed=0)  # B = 0 would hide differences in the LoRA path
    ids = torch.randint(10, 1000, (2, seq), generator=torch.Generator().manual_seed(1)).to(device)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    torch.manual_seed(1)  # the dropout masks' seed
    before = torch.cuda.memory_allocated(device) if device == "cuda" else 0
    loss, _ = module.loss_on({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    held = torch.cuda.memory_allocated(device) - before if device == "cuda" else 0  # kept for backward
    loss.backward()
    return loss.detach(), [p.grad for p in module.model.parameters() if p.requires_grad], held


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_offloaded_checkpointing_gives_the_plain_loss_and_gradients_bitwise(tiny_chat_llama_dir, dropout):
    plain = loss_and_grads(tiny_chat_llama_dir, offload=False, dropout=dropout)
    offloaded = loss_and_grads(tiny_chat_llama_dir, offload=True, dropout=dropout)
    assert torch.equal(plain[0], offloaded[0])
    assert all(
        torch.equal(a, b) for a, b in zip(plain[1], offloaded[1], strict=True)
    )  # the recomputation redrew the same masks


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("outputs", [("self_attn.o_proj",), ALL_BUT_DOWN], ids=["o_proj", "all-but-down"])
def test_outputs_kept_from_forward_give_the_plain_loss_and_gradients_bitwise(tiny_chat_llama_dir, outputs, compiled):
    """`offload_outputs`: the recomputation takes those projections' outputs from forward instead of redoing their
    frozen matmul, with dropout on; the loss and every gradient are bitwise those of plain checkpointing. Compiled,
    the two ops run inside the layer's graphs (forward's keep, the recomputation's take-back)."""
    torch._dynamo.reset()
    plain = loss_and_grads(tiny_chat_llama_dir, offload=False, dropout=0.3, compiled=compiled)
    kept = loss_and_grads(tiny_chat_llama_dir, offload=True, dropout=0.3, outputs=outputs, compiled=compiled)
    assert torch.equal(plain[0], kept[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], kept[1], strict=True))


@requires_cuda
def test_on_the_gpu_the_layer_inputs_leave_it_and_the_gradients_stay(tiny_chat_llama_dir):
    plain = loss_and_grads(tiny_chat_llama_dir, offload=False, dropout=0.1, device="cuda", seq=512)
    offloaded = loss_and_grads(tiny_chat_llama_dir, offload=True, dropout=0.1, device="cuda", seq=512)
    torch.testing.assert_close(offloaded[0], plain[0], rtol=1e-3, atol=0)
    for a, b in zip(plain[1], offloaded[1], strict=True):
        assert (b.float() - a.float()).norm() <= 1e-2 * a.float().norm()
    # (batch × seq × hidden) bf16: what plain checkpointing keeps on the GPU for each of the 2 layers. The first
    # layer's input stays there either way: it is the embedding output, which transformers makes a leaf that
    # requires grad (`enable_input_require_grads`, so that checkpointed layers get gradients), and autograd holds
    # such a leaf until backward. So the offload moves the inputs of every layer but the first.
    one_input = 2 * 512 * 64 * 2
    layers = 2
    assert plain[2] - offloaded[2] >= (layers - 1) * one_input


@pytest.mark.parametrize(
    ("kept", "reused"),
    [((), ()), (("self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"), (".self_attn.o_proj", ".mlp.up_proj"))],
    ids=["none-kept", "o-up-down-kept"],
)
def test_the_recomputation_skips_the_frozen_matmul_of_down_proj_and_of_kept_outputs(tiny_chat_llama_dir, kept, reused):
    """Each LoRA layer's frozen weight is materialised once when the layer is recomputed and once in backward, but
    `mlp.down_proj` (a LLaMA layer adds its output to the residual and returns it) skips the recomputation's, and so
    do the projections `offload_outputs` names (their outputs come from forward); naming `mlp.down_proj` there
    changes nothing. The gradients stay bitwise those of plain checkpointing (the tests above)."""
    model = load_model(
        str(tiny_chat_llama_dir),
        lora=LoraSpec(r=4),
        offload_activations=True,
        offload_outputs=kept,
        with_tokenizer=False,
    )
    layers = lora_layers(model.model)
    calls = dict.fromkeys(layers, 0)
    for name, layer in layers.items():
        weight = layer.base_layer.dense_weight

        def counted(name=name, weight=weight) -> torch.Tensor:
            calls[name] += 1
            return weight()

        layer.base_layer.dense_weight = counted  # type: ignore[method-assign]
    model.model(torch.randint(10, 256, (1, 8))).logits.sum().backward()
    assert {n for n, layer in layers.items() if layer.skip_base_on_recompute} == {
        n for n in layers if n.endswith(".mlp.down_proj")
    }
    assert {n for n, layer in layers.items() if layer.reuse_output_on_recompute} == {
        n for n in layers if n.endswith(reused)
    }
    assert calls == {n: 1 if n.endswith((".mlp.down_proj", *reused)) else 2 for n in layers}


@requires_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_on_the_gpu_kept_outputs_come_back_as_forward_computed_them(tiny_chat_llama_dir, compiled):
    """On the GPU the kept outputs go to the host on a side stream while the layer goes on (a compiled layer's next
    kernels may write into an output's buffer: the copy reads the op's own snapshot); the gradients stay those of
    plain checkpointing within bf16's rounding, as without kept outputs."""
    torch._dynamo.reset()
    plain = loss_and_grads(tiny_chat_llama_dir, offload=False, dropout=0.1, device="cuda", seq=512, compiled=compiled)
    kept = loss_and_grads(
        tiny_chat_llama_dir, offload=True, dropout=0.1, device="cuda", seq=512, outputs=ALL_BUT_DOWN, compiled=compiled
    )
    torch.testing.assert_close(kept[0], plain[0], rtol=1e-3, atol=0)
    # bf16: compiled, offloaded layers without kept outputs are already 1.0 % off plain checkpointing in their
    # worst gradient (H200, 2026-12-05), with them 1.04 %, and 0.96 % apart from each other
    tol = 2e-2 if compiled else 1e-2
    for a, b in zip(plain[1], kept[1], strict=True):
        assert (b.float() - a.float()).norm() <= tol * a.float().norm()


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"offload_outputs": ("self_attn.o_proj",)}, "turn on offload_activations"),
        ({"offload_outputs": ("self_attn.o_proj",), "gradient_checkpointing": False}, "turn on gradient_checkpointing"),
        (
            {"offload_outputs": ("attn.out_proj",), "offload_activations": True},
            r"'attn.out_proj' names no LoRA layer of this model; its projections: \['mlp.down_proj', ",
        ),
    ],
)
def test_offload_outputs_refuses_what_it_cannot_do(tiny_llama_dir, settings, error):
    with pytest.raises(ValueError, match=error):
        load_model(str(tiny_llama_dir), lora=LoraSpec(r=4), with_tokenizer=False, **settings)


def test_a_forward_without_backward_leaves_nothing_behind(tiny_llama_dir):
    model = load_model(
        str(tiny_llama_dir),
        lora=LoraSpec(r=4),
        offload_activations=True,
        offload_outputs=("self_attn.o_proj",),  # kept with the input: released with it
        with_tokenizer=False,
    ).model
    model(torch.randint(0, 256, (1, 8))).logits.sum()  # gradients on, never back-propagated
    gc.collect()
    assert all(ref() is None for ref in _copies.pending)


def test_offloading_needs_checkpointing(tiny_llama_dir):
    with pytest.raises(ValueError, match="turn on both"):
        load_model(str(tiny_llama_dir), offload_activations=True, gradient_checkpointing=False, with_tokenizer=False)


def test_with_compiled_layers_the_skip_leaves_what_the_recomputation_saves_unchanged(tiny_chat_llama_dir, monkeypatch):
    """The skipped matmul must not change what a compiled layer's recomputation saves for its backward. With zeros
    as the skipped output nothing in the recomputation's forward read the MLP, so Inductor's partitioner moved the
    MLP's whole forward into the backward graph, where an H200's memory snapshot found the skip's extra peak (0.5 GiB
    at 7B); returning the LoRA update instead keeps the MLP in forward. Compared: the activation-sized tensors
    saved."""

    def saved_activations() -> list[tuple[tuple[int, ...], torch.dtype]]:
        module, data = tiny_module_and_data(tiny_chat_llama_dir, dropout=0.1)
        module.compile_layers, module.offload_activations = True, True
        module.configure_model()
        data.setup("fit")
        batch = next(iter(data.val_dataloader()))
        tokens = batch["input_ids"].numel()  # activation-sized: not the LoRA factors or quantization constants
        return sorted(
            ((tuple(t.shape), t.dtype) for t in saved_for_backward(module, batch) if t.numel() >= tokens * 8), key=str
        )

    skipping = saved_activations()
    monkeypatch.setattr("qlora_lightning.model.RESIDUAL_ONLY_OUTPUTS", {})
    assert skipping == saved_activations() and skipping
