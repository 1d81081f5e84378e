"""QLoRAModule under Lightning: adapter-only checkpoints, PEFT folders, exact resume, configs."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from qlora_testing import (
    FP32,
    assert_bnb_cpu_repacking_off,
    cpu_trainer,
    randomize_adapters,
    requires_cuda,
    saved_for_backward,
    straight_run_adapters,
    tiny_module_and_data,
    transformers_4bit,
)
from safetensors.torch import load_file

from qlora_lightning import QLoRAModule
from qlora_lightning.adapters import adapter_state_dict, is_adapter_key
from qlora_lightning.callbacks import training_monitors
from qlora_lightning.lora_autograd import COMPILE_OPTIONS, DequantizeInBackward
from qlora_lightning.module import compile_decoder_layers, examples_in, labelled_positions
from qlora_lightning.resume import CheckpointError, read_checkpoint
from qlora_lightning.specs import LoraSpec, QuantSpec


def test_fit_writes_adapter_only_checkpoints_with_peft_folders(tiny_chat_llama_dir, tmp_path):
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    t = cpu_trainer(tmp_path, max_steps=4, callbacks=training_monitors())
    t.fit(module, data)
    ckpt_dir = tmp_path / "checkpoints"
    assert {p.name for p in ckpt_dir.iterdir()} == {
        "step=2.ckpt",
        "step=4.ckpt",
        "last.ckpt",
        "step=2",
        "step=4",
        "last",
    }
    ckpt = torch.load(ckpt_dir / "step=4.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys and all(is_adapter_key(k) for k in keys)
    assert len(keys) == 2 * 7 * 2  # 2 layers × 7 projections × (A, B)
    adapter_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    base_bytes = sum(p.numel() * p.element_size() for p in module.model.parameters() if not p.requires_grad)
    assert adapter_bytes < base_bytes / 10  # by size too: no base weight hides under another name
    assert "optimizer_states" in ckpt and ckpt["global_step"] == 4 and ckpt["lr_schedulers"]
    assert "InstructionDataModule" in ckpt  # the data position, for mid-epoch resume
    peft = load_file(ckpt_dir / "step=4" / "adapter_model.safetensors")
    ours = adapter_state_dict(module.model)
    assert all(torch.equal(peft[f"base_model.model.{k}.weight"], v) for k, v in ours.items())
    final = Path(t.log_dir) / "adapter"
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_chat_llama_dir
    )
    metrics = (Path(t.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("train/loss", "train/tokens_per_s", "train/lr", "train/peak_host_mem_gib", "val/loss"):
        assert column in metrics


def test_trained_adapter_in_peft_gives_our_logits(tiny_chat_llama_dir, tmp_path):
    from peft import PeftModel

    module, data = tiny_module_and_data(tiny_chat_llama_dir, dropout=0.0)
    t = cpu_trainer(tmp_path, max_steps=3, every=3)
    t.fit(module, data)
    assert any(torch.count_nonzero(layer.lora_B) for layer in module.model.modules() if hasattr(layer, "lora_B"))
    base = transformers_4bit(tiny_chat_llama_dir, compute_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, Path(t.log_dir) / "adapter").eval()
    x = torch.randint(0, 1000, (2, 16))
    ours = module.model.eval()(x).logits
    theirs = peft_model(x).logits
    assert_bnb_cpu_repacking_off(base)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("accumulate", "padding_free"), [(1, False), (2, False), (2, True)], ids=["padded", "padded-accumulate", "packed"]
)
def test_resume_mid_epoch_equals_the_uninterrupted_run_bitwise(tiny_chat_llama_dir, tmp_path, accumulate, padding_free):
    """N steps + resume to 2N gives exactly the adapters of 2N straight (dropout on, same data order), with padded
    and with packed rows (`data.padding_free`)."""
    straight = straight_run_adapters(
        tiny_chat_llama_dir,
        tmp_path / "straight",
        6,
        padding_free=padding_free,
        every=3,
        accumulate_grad_batches=accumulate,
    )

    L.seed_everything(0)
    module, data = tiny_module_and_data(tiny_chat_llama_dir, padding_free=padding_free)
    cpu_trainer(tmp_path / "cut", max_steps=3, every=3, accumulate_grad_batches=accumulate).fit(module, data)
    L.seed_everything(123)  # a resumed process starts from another RNG state: the checkpoint must restore it
    module, data = tiny_module_and_data(tiny_chat_llama_dir, padding_free=padding_free)
    cpu_trainer(tmp_path / "cut", max_steps=6, every=3, accumulate_grad_batches=accumulate).fit(
        module, data, ckpt_path=tmp_path / "cut" / "checkpoints" / "step=3.ckpt"
    )
    resumed = adapter_state_dict(module.model)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_checkpoint_of_another_lora_config_is_a_clear_error(tiny_chat_llama_dir, tmp_path):
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    cpu_trainer(tmp_path, max_steps=2).fit(module, data)
    other = QLoRAModule(str(tiny_chat_llama_dir), quant=FP32, lora=LoraSpec(r=8, target_modules=("q_proj",)))
    with pytest.raises(CheckpointError, match="model.lora.target_modules: checkpoint 'all-linear', this run"):
        other.on_load_checkpoint(read_checkpoint(tmp_path / "checkpoints" / "last.ckpt"))


@pytest.mark.parametrize("compile_layers", [False, True])
def test_validate_test_and_predict_run_on_the_held_out_split(tiny_chat_llama_dir, tmp_path, compile_layers):
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    module.predict_max_new_tokens, module.compile_layers = 4, compile_layers
    t = L.Trainer(
        default_root_dir=tmp_path,
        precision="32-true",
        accelerator="cpu",
        limit_val_batches=2,
        limit_test_batches=2,
        limit_predict_batches=1,
        enable_progress_bar=False,
        logger=False,
    )
    (val,) = t.validate(module, data)
    (test,) = t.test(module, data)
    assert val["val/loss"] == pytest.approx(test["test/loss"]) and val["val/perplexity"] > 1
    (rows,) = t.predict(module, data)
    assert len(rows) == 8 and all(r["prompt"].rstrip().endswith("### Assistant:") for r in rows)
    assert all(isinstance(r["answer"], str) and r["reference"] for r in rows)
    torch._dynamo.reset()


def test_loss_on_labelled_positions_equals_transformers_loss(tiny_chat_llama_dir):
    module, data = tiny_module_and_data(tiny_chat_llama_dir, dropout=0.0)
    module.configure_model()
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    loss, n = module.loss_on(batch)
    ref = module.model(**batch).loss  # shifts and ignores -100 itself, over the full logits
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert n == (batch["labels"][:, 1:] != -100).sum() > 0
    loss.backward()
    assert all(p.grad is not None for n_, p in module.model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_labelled_positions_are_the_rows_the_label_mask_picks(packed):
    """`labelled_positions` gives the flattened hidden states' rows whose next token is labelled, in the order the
    boolean mask takes them, and those tokens: the loss gathers the same rows as `hidden[:, :-1][mask]`."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (1, 40) if packed else (3, 12), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.5] = -100
    hidden = torch.randn(*labels.shape, 4, generator=generator)
    rows, targets = labelled_positions(labels)
    mask = labels[:, 1:] != -100
    assert torch.equal(hidden.flatten(0, 1)[rows], hidden[:, :-1][mask])
    assert torch.equal(targets, labels[:, 1:][mask]) and 0 < len(rows) < mask.numel()


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_a_transferred_batch_keeps_its_labels_and_count_on_the_host(tiny_chat_llama_dir, padding_free):
    """Lightning's transfer moves every model input and leaves `labels` (and a packed row's `num_examples`) where the
    loader made them, so that `loss_on` and the step count them on the host; the loss is the same as with every
    tensor on one device, bitwise."""
    module, data = tiny_module_and_data(tiny_chat_llama_dir, dropout=0.0, padding_free=padding_free)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    host = {"labels", "num_examples"} & batch.keys()
    assert moved.keys() == batch.keys() and all(moved[k] is batch[k] for k in host)
    assert host == ({"labels", "num_examples"} if padding_free else {"labels"})
    assert all(v.device.type == "meta" for k, v in moved.items() if k not in host and torch.is_tensor(v))
    module.configure_model()
    randomize_adapters(module.model, seed=0)
    here = module.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert torch.equal(module.loss_on(here)[0], module.loss_on(move_data_to_device(batch, "cpu"))[0])


@requires_cuda
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_on_the_gpu_the_step_s_counts_add_no_synchronization(tiny_chat_llama_dir, padding_free):
    """With the labels (and a packed row's example count) on the host, the loss and the step's example count add no
    device synchronization to forward: the boolean-mask gather they replaced, and `int()` of a count on the device,
    waited for the whole forward. Same loss within bf16's rounding."""
    import warnings

    module, data = tiny_module_and_data(tiny_chat_llama_dir, dropout=0.0, padding_free=padding_free)
    module.quant = QuantSpec(compute_dtype="bfloat16")
    module.to("cuda").configure_model()
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))

    def synchronizations(batch) -> tuple[torch.Tensor, int]:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loss, _ = module.loss_on(batch)
                examples_in(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return loss, sum("synchronizing" in str(w.message) for w in caught)

    on_host, host_syncs = synchronizations(module.transfer_batch_to_device(batch, torch.device("cuda"), 0))
    on_device, device_syncs = synchronizations(move_data_to_device(batch, "cuda"))
    # Packed, the boolean gather and the count's int() were two waits, both gone. Padded, an H200 counted 3 and 3
    # (2026-12-05): transformers' own mask code waits too, and where the gather's wait went is not yet explained.
    assert host_syncs < device_syncs if padding_free else host_syncs <= device_syncs, (host_syncs, device_syncs)
    torch.testing.assert_close(on_host, on_device, rtol=1e-3, atol=0)


def loss_and_grads(base, *, compile_layers, dropout, gradient_checkpointing=True, offload=False, device="cpu", seed=1):
    module, data = tiny_module_and_data(base, dropout=dropout)
    module.compile_layers, module.gradient_checkpointing = compile_layers, gradient_checkpointing
    module.offload_activations = offload
    if device != "cpu":  # the GPU recipe: bf16 compute
        module.quant = QuantSpec(compute_dtype="bfloat16")
    module.to(device).configure_model()
    randomize_adapters(module.model, seed=0)  # B = 0 would hide differences in the LoRA path
    data.setup("fit")
    batch = move_data_to_device(next(iter(data.val_dataloader())), device)
    torch.manual_seed(seed)  # the dropout masks' seed
    loss, _ = module.loss_on(batch)
    loss.backward()
    return loss.detach(), [p.grad for p in module.model.parameters() if p.requires_grad]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_compiled_layers_give_the_uncompiled_loss_and_gradients(tiny_chat_llama_dir, device, dropout):
    """With dropout too: compiled layers draw the masks eager layers draw from the same seed (torch's dropout
    kernel, `lora_autograd.COMPILE_OPTIONS`); with Inductor's own random numbers the gradients differed by 107 %."""
    loss_a, grads_a = loss_and_grads(tiny_chat_llama_dir, compile_layers=False, dropout=dropout, device=device)
    loss_b, grads_b = loss_and_grads(tiny_chat_llama_dir, compile_layers=True, dropout=dropout, device=device)
    # fp32 on CPU: summation order only; bf16 on CUDA: fused kernels round once where eager rounds per op.
    tol = dict(rtol=1e-5, atol=1e-6) if device == "cpu" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss_b, loss_a, **tol)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert (b.float() - a.float()).norm() <= (5e-5 if device == "cpu" else 3e-2) * a.float().norm()
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("device", "padding_free"),
    [("cpu", False), pytest.param("cuda", False, marks=requires_cuda), pytest.param("cuda", True, marks=requires_cuda)],
    ids=["cpu-padded", "cuda-padded", "cuda-packed"],
)
@pytest.mark.parametrize("kept", [False, True], ids=["", "offloaded-kept"])
def test_compiled_layers_stop_recompiling_after_a_few_lengths(tiny_chat_llama_dir, device, padding_free, kept):
    """Grouped or packed batches change length every step. Compiled layers may specialise on the first lengths
    they see, but must then cover every new length without compiling again: recompiling per step would cost seconds
    a step and, past dynamo's recompile limit, fall back to eager layers. (Packed rows on the CPU are not compiled:
    their per-example attention breaks the graph inside the checkpointed layer, so dynamo runs it eagerly.) Seen:
    CPU padded, graphs [1, 2, 2, ...]; CUDA bf16 padded, [1, 2, 2, 2, 3, 3, ...], the third graph at the first
    length that is a multiple of 16 (48), likely an alignment guard of the GPU's matmuls (not traced). Offloaded, the
    recomputation is a graph of its own, so twice the graphs: CPU padded [2, 4, 4, ...], with or without attention
    outputs kept for it (`offload_outputs`, which add none)."""
    from torch._dynamo.utils import counters

    module, data = tiny_module_and_data(tiny_chat_llama_dir, batch_size=4, padding_free=padding_free)
    module.compile_layers = True
    if kept:
        module.offload_activations, module.offload_outputs = True, ("self_attn.o_proj", "self_attn.v_proj")
    if device == "cuda":
        module.quant = QuantSpec(compute_dtype="bfloat16")  # the GPU recipe's; varlen_attn takes 16-bit floats only
    module.to(device).configure_model()
    data.setup("fit")
    batches = list(data.train_dataloader())[:9]
    lengths = [b["input_ids"].shape[-1] for b in batches]
    assert len(set(lengths[5:]) - set(lengths[:5])) >= 3  # the checked steps bring lengths not seen before
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for batch in batches:
        loss, _ = module.loss_on(move_data_to_device(batch, device))
        loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    per_length = 2 if kept else 1  # forward, and the offloaded recomputation's own graph
    assert graphs[0] >= 1 and graphs[5:] == [graphs[4]] * 4 and graphs[-1] <= 3 * per_length, (lengths, graphs)


def test_compiling_layers_for_ddp_leaves_dynamos_process_wide_settings_alone(tiny_chat_llama_dir, monkeypatch):
    """Dynamo's DDPOptimizer is switched off for the compiled layers' calls only: research code that compiles
    something else in the same process keeps torch's default."""
    module, _ = tiny_module_and_data(tiny_chat_llama_dir)
    module.configure_model()
    before = torch._dynamo.config.optimize_ddp
    seen = []
    layer = module.model.get_decoder().layers[0]
    layer.forward = lambda: seen.append(torch._dynamo.config.optimize_ddp)  # the setting a compiled call sees
    monkeypatch.setattr(torch, "compile", lambda forward, **options: forward)  # compiling is not what is tested
    compile_decoder_layers(module.model, data_parallel=True)
    layer.forward()
    assert seen == [False] and torch._dynamo.config.optimize_ddp == before


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_compiled_dropout_is_redrawn_identically_when_checkpointing_recomputes(tiny_chat_llama_dir, device):
    """Recomputation in backward must draw the compiled forward's dropout masks again."""
    kept = loss_and_grads(
        tiny_chat_llama_dir, compile_layers=True, dropout=0.3, gradient_checkpointing=False, device=device
    )
    torch._dynamo.reset()
    recomputed = loss_and_grads(tiny_chat_llama_dir, compile_layers=True, dropout=0.3, device=device)
    torch._dynamo.reset()
    no_dropout = loss_and_grads(tiny_chat_llama_dir, compile_layers=True, dropout=0.0, device=device)
    torch._dynamo.reset()
    other_masks = loss_and_grads(tiny_chat_llama_dir, compile_layers=True, dropout=0.3, device=device, seed=2)
    torch._dynamo.reset()

    def grad_gap(a, b):
        return max(((y.float() - x.float()).norm() / x.float().norm()).item() for x, y in zip(a[1], b[1], strict=True))

    assert grad_gap(kept, other_masks) > 0.1  # what redrawing other masks would do
    if device == "cpu":
        assert torch.equal(kept[0], recomputed[0]) and all(
            torch.equal(a, b) for a, b in zip(kept[1], recomputed[1], strict=True)
        )
    else:  # with and without checkpointing Inductor fuses differently, and bf16 rounds accordingly
        torch.testing.assert_close(recomputed[0], kept[0], rtol=1e-3, atol=0)
        assert grad_gap(kept, recomputed) <= 3e-2
    assert not torch.equal(kept[0], no_dropout[0])  # dropout is really on


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_compiled_offloaded_layers_recompute_compiled_with_the_forward_s_dropout_masks(tiny_chat_llama_dir, device):
    """With offloaded checkpointing the compiled layer runs once without gradients and is recomputed in backward:
    the recomputation must run compiled too (transformers >= 5.2x checkpoints inside `forward`, which left it
    uncompiled until `module.compile_decoder_layers` compiled what the checkpoint runs) and draw the forward's
    masks; its gradients are then those of the layers compiled without checkpointing. Run after other tests in one
    process too: the checkpoint's compiled copy was once made inside dynamo's tracing, where `torch.compile` gives
    the function back uncompiled, whenever nothing before had broken the graph (here: after the FSDP family test).
    """
    kept = loss_and_grads(
        tiny_chat_llama_dir, compile_layers=True, dropout=0.3, gradient_checkpointing=False, device=device
    )
    torch._dynamo.reset()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        offloaded = loss_and_grads(tiny_chat_llama_dir, compile_layers=True, dropout=0.3, offload=True, device=device)
    torch._dynamo.reset()
    assert any(e.name == "CompiledFunctionBackward" for e in prof.events()), sorted(
        {e.name for e in prof.events() if "ompil" in e.name or "Offload" in e.name}
    )
    torch.testing.assert_close(offloaded[0], kept[0], rtol=1e-5 if device == "cpu" else 1e-3, atol=0)
    for a, b in zip(kept[1], offloaded[1], strict=True):
        assert (b.float() - a.float()).norm() <= (1e-4 if device == "cpu" else 3e-2) * a.float().norm()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("layers", ["kept", "offloaded"])
def test_compiled_layers_save_no_dequantized_weight_for_backward(tiny_chat_llama_dir, device, layers, monkeypatch):
    """A compiled layer must not keep its frozen weights' dense (dequantized) copies from forward to backward:
    AOTAutograd saved them, as it saves every custom op's output, until `lora_autograd.DequantizeInBackward` had
    them recomputed in backward. Without activation checkpointing ("kept") that held a dense model in memory; with
    offloading, each recomputed layer's dense weights until its backward (0.38 GiB at 7B). Counted: tensors saved
    for backward shaped and typed as a frozen weight; the same run without the pass shows the count can fail."""

    def dense_weights_saved() -> tuple[int, list[torch.Tensor]]:
        module, data = tiny_module_and_data(tiny_chat_llama_dir, dropout=0.3)
        module.compile_layers, module.gradient_checkpointing = True, layers == "offloaded"
        module.offload_activations = layers == "offloaded"
        if device != "cpu":
            module.quant = QuantSpec(compute_dtype="bfloat16")
        module.to(device).configure_model()
        randomize_adapters(module.model, seed=0)  # B = 0 would leave A without gradients to compare
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        shapes = {(m.out_features, m.in_features) for m in module.model.modules() if hasattr(m, "dense_weight")}
        data.setup("fit")
        batch = move_data_to_device(next(iter(data.val_dataloader())), device)
        assert batch["input_ids"].numel() not in {s[0] for s in shapes}  # no activation shaped as a weight
        torch.manual_seed(1)  # the dropout masks' seed
        saved = saved_for_backward(module, batch)
        count = sum(tuple(t.shape) in shapes and t.dtype == dtype for t in saved)
        return count, [p.grad for p in module.model.parameters() if p.requires_grad]

    count, grads = dense_weights_saved()
    without_pass = {k: v for k, v in COMPILE_OPTIONS.items() if not isinstance(v, DequantizeInBackward)}
    monkeypatch.setattr("qlora_lightning.module.COMPILE_OPTIONS", without_pass)
    count_without, grads_without = dense_weights_saved()
    assert count == 0 and count_without > 0, (count, count_without)
    for a, b in zip(grads, grads_without, strict=True):  # the same arithmetic, fused differently (bf16 on CUDA)
        assert (b.float() - a.float()).norm() <= (1e-5 if device == "cpu" else 1e-2) * a.float().norm()


@pytest.mark.parametrize("optimizer", ["default", "bitsandbytes"])
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_chat_llama_dir, tmp_path, optimizer):
    """With the default optimizer the guard's decision is read inside its step, before any update
    (`PagedAdamW32bitOneSync.check_before_update`); with any other, in the hook before the step."""
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    if optimizer == "bitsandbytes":
        module.optimizer_factory = lambda params: bnb.optim.PagedAdamW32bit(params, lr=2e-4)
    loss_on = module.loss_on

    def diverging(batch):
        loss, n = loss_on(batch)
        return (loss * float("inf") if module.trainer.global_step == 2 else loss), n

    module.loss_on = diverging
    t = cpu_trainer(tmp_path, max_steps=6, every=1)
    with pytest.raises(
        FloatingPointError, match="training stopped at step 3: the loss \\(inf on this rank\\)"
    ) as caught:
        t.fit(module, data)
    raised_in = [frame.name for frame in traceback.extract_tb(caught.tb)]
    called_from = "_step" if optimizer == "default" else "on_before_optimizer_step"  # PagedAdamW32bitOneSync._step
    assert raised_in[-2:] == [called_from, "check"], raised_in
    last = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 and all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert all(torch.isfinite(p).all() for p in module.model.parameters() if p.requires_grad)  # no step applied
    assert not (Path(t.log_dir) / "adapter").exists()  # no final adapter from a diverged run


def test_results_are_readable_by_the_group_as_the_umask_says(tiny_chat_llama_dir, tmp_path):
    """Temporary files are created 0600 and renamed into place; colleagues on a shared cluster must be able to
    read checkpoints and adapters when the umask allows it."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        module, data = tiny_module_and_data(tiny_chat_llama_dir)
        t = cpu_trainer(tmp_path, max_steps=2)
        t.fit(module, data)
    finally:
        os.umask(old)
    written = [
        tmp_path / "checkpoints",
        *(tmp_path / "checkpoints").rglob("*"),
        *(Path(t.log_dir) / "adapter").rglob("*"),
    ]
    wrong = {
        str(p): oct(stat.S_IMODE(p.stat().st_mode))
        for p in written
        if stat.S_IMODE(p.stat().st_mode) != (0o755 if p.is_dir() else 0o644)
    }
    assert len(written) > 8 and not wrong


def test_a_negative_warmup_is_refused():
    with pytest.raises(ValueError, match="warmup_ratio must be in \\[0, 1\\)"):
        QLoRAModule("unused", warmup_ratio=-0.1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize(
    "layers",
    [
        "eager",
        pytest.param("compiled-offloaded", marks=pytest.mark.slow),
        pytest.param("compiled-offloaded-kept", marks=pytest.mark.slow),
    ],
)
def test_packed_batches_give_the_padded_loss_and_gradients(tiny_chat_llama_dir, device, layers):
    """The same 8 examples, padded and padding-free (data.padding_free): the same loss and gradients, with eager
    layers and with the GPU configs' compiled layers and offloaded checkpointing (and with the attention
    projections' outputs kept for the recomputation, `offload_outputs`: packed rows change length every batch)."""
    results = []
    for padding_free in (False, True):
        module, data = tiny_module_and_data(tiny_chat_llama_dir, dropout=0.0, batch_size=8, padding_free=padding_free)
        module.compile_layers = module.offload_activations = layers.startswith("compiled-offloaded")
        if layers.endswith("-kept"):
            module.offload_outputs = ("q_proj", "k_proj", "v_proj", "o_proj")
        if device != "cpu":
            module.quant = QuantSpec(compute_dtype="bfloat16")
        module.to(device).configure_model()
        randomize_adapters(module.model, seed=0)
        data.setup("fit")
        batch = move_data_to_device(next(iter(data.val_dataloader())), device)
        assert ("position_ids" in batch) == padding_free and ("attention_mask" in batch) != padding_free
        loss, n = module.loss_on(batch)
        loss.backward()
        results.append(
            (loss.detach().float(), n, [p.grad.float() for p in module.model.parameters() if p.requires_grad])
        )
    torch._dynamo.reset()
    (padded_loss, padded_n, padded_grads), (packed_loss, packed_n, packed_grads) = results
    assert padded_n == packed_n
    tol = 1e-5 if device == "cpu" else 2e-2  # bf16 on CUDA: other summation orders in attention
    torch.testing.assert_close(packed_loss, padded_loss, rtol=tol, atol=0)
    gaps = [((b - a).norm() / a.norm()).item() for a, b in zip(padded_grads, packed_grads, strict=True)]
    assert max(gaps) <= tol * 10, gaps


def test_validate_then_fit_on_the_same_module(tiny_chat_llama_dir, tmp_path):
    """A baseline `validate` before `fit` (as an experiment measures before and after) must not break fit's own
    validation when that runs without inference mode (`inference_mode=False`, as FSDP needs): the first validation
    left the loss metric's state as inference-mode tensors, which cannot be updated outside it."""
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    (before,) = cpu_trainer(tmp_path / "before", max_steps=2).validate(module, data)
    validated = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    t = cpu_trainer(tmp_path / "fit", max_steps=2, inference_mode=False)
    t.fit(module, data)
    fit_loss = float(t.callback_metrics["val/loss"])  # fit's own validation, at its last step
    (after,) = t.validate(module, data)
    params = dict(module.model.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    changed = {name for name, p in params.items() if not torch.equal(p.detach(), validated[name])}
    assert len(trainable) == 2 * 7 * 2 and all(name.endswith((".lora_A", ".lora_B")) for name in trainable)
    assert changed == trainable  # every LoRA factor trained, no frozen weight touched
    assert after["val/loss"] == pytest.approx(fit_loss, rel=1e-6) and after["val/loss"] != before["val/loss"]


def test_bf16_validation_loss_is_summed_in_float32(tiny_chat_llama_dir, tmp_path):
    """Under `bf16-true` Lightning converts the whole module, the loss metric with it: a bf16 sum over the held-out
    batches (label counts past 256 lose integers) was off by percents, as large as the differences the fidelity
    experiment compares. The validation loss is the float64 mean of the batches' losses weighted by their labels."""
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    data.eval_batch_size = 1  # one batch per held-out record: many additions to the sums
    module.quant = QuantSpec(compute_dtype="bfloat16")
    t = L.Trainer(default_root_dir=tmp_path, precision="bf16-true", accelerator="cpu", logger=False)
    t.enable_progress_bar = False
    (val,) = t.validate(module, data)
    total = count = 0.0
    module.to("cpu")
    with torch.no_grad():
        for batch in data.val_dataloader():
            loss, n = module.loss_on(batch)
            total, count = total + float(loss) * int(n), count + int(n)
    assert count > 256
    assert val["val/loss"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize(
    "trainer_args, lr, message",
    [
        (dict(max_steps=0), 2e-4, "trainer.max_steps is 0, a run that trains nothing"),
        (dict(max_steps=-1, max_epochs=0), 2e-4, "trainer.max_epochs is 0, a run that trains nothing"),
        (dict(max_steps=2, gradient_clip_val=-1.0), 2e-4, "trainer.gradient_clip_val is -1.0: Lightning then clips"),
        (dict(max_steps=2), 0.0, r"model.optimizer.init_args.lr \(the optimizer's learning rate\) is 0"),
        (dict(max_steps=2), -1e-3, "refuses its settings \\(Invalid learning rate: -0.001\\)"),
    ],
    ids=["max_steps-0", "max_epochs-0", "clip-negative", "lr-0", "lr-negative"],
)
def test_a_plain_trainer_refuses_settings_that_would_train_nothing(
    tiny_chat_llama_dir, tmp_path, trainer_args, lr, message
):
    """Research code's own `lightning.Trainer` gets the errors the command line gives, before the model loads;
    these runs used to end "successfully" with an untrained "final adapter"."""
    import functools

    from qlora_lightning.preflight import SettingError

    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    module.optimizer_factory = functools.partial(torch.optim.AdamW, lr=lr)
    trainer = cpu_trainer(tmp_path, val_check_interval=1.0, **trainer_args)
    with pytest.raises(SettingError, match=message):
        trainer.fit(module, data)
    assert module.model is None  # refused before the model loaded
    assert not list(tmp_path.glob("**/*.ckpt")) and not list(tmp_path.glob("**/adapter"))
