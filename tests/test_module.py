"""QLoRAModule under Lightning: adapter-only checkpoints, PEFT folders, exact resume, configs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlora_lightning import AtomicCheckpointIO, InstructionDataModule, QLoRAModule
from qlora_lightning.checkpoint import adapter_state_dict, is_adapter_key
from qlora_lightning.model import LoraSpec, QuantSpec
from qlora_testing import requires_cuda

REPO = Path(__file__).resolve().parents[1]
# float32 compute: this CPU has no native bf16 matmul (4-90× slower by shape); the recipe is otherwise the paper's.
FP32 = QuantSpec(compute_dtype="float32")


def make(base, *, r=8, dropout=0.1, batch_size=4):
    module = QLoRAModule(str(base), quant=FP32, lora=LoraSpec(r=r, alpha=16, dropout=dropout))
    data = InstructionDataModule(str(base), dataset="bundled:orca_sample_train", val_dataset="bundled:orca_sample_val",
                                 max_examples=48, batch_size=batch_size, eval_batch_size=8, num_workers=0,
                                 pad_to_multiple_of=None)
    return module, data


def trainer(root, max_steps, every=2, **kwargs):
    ckpt = ModelCheckpoint(dirpath=Path(root) / "checkpoints", filename="{step}", every_n_train_steps=every,
                           save_last=True, save_top_k=-1)
    return L.Trainer(default_root_dir=root, max_steps=max_steps, precision="32-true", accelerator="cpu",
                     plugins=[AtomicCheckpointIO()], callbacks=[ckpt], enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=1, val_check_interval=max_steps,
                     log_every_n_steps=1, **kwargs)


def test_fit_writes_adapter_only_checkpoints_with_peft_folders(tiny_chat_llama_dir, tmp_path):
    module, data = make(tiny_chat_llama_dir)
    t = trainer(tmp_path, max_steps=4)
    t.fit(module, data)
    ckpt_dir = tmp_path / "checkpoints"
    assert {p.name for p in ckpt_dir.iterdir()} == {"step=2.ckpt", "step=4.ckpt", "last.ckpt", "step=2", "step=4",
                                                    "last"}
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
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_chat_llama_dir)
    metrics = (Path(t.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("train/loss", "train/tokens_per_s", "train/lr", "val/loss", "val/perplexity"):
        assert column in metrics


def test_trained_adapter_in_peft_gives_our_logits(tiny_chat_llama_dir, tmp_path):
    from peft import PeftModel

    module, data = make(tiny_chat_llama_dir, dropout=0.0)
    t = trainer(tmp_path, max_steps=3, every=3)
    t.fit(module, data)
    assert any(torch.count_nonzero(layer.lora_B) for layer in module.model.modules() if hasattr(layer, "lora_B"))
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, quantization_config=config, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, Path(t.log_dir) / "adapter").eval()
    x = torch.randint(0, 1000, (2, 16))
    ours = module.model.eval()(x).logits
    torch.testing.assert_close(peft_model(x).logits, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_mid_epoch_equals_the_uninterrupted_run_bitwise(tiny_chat_llama_dir, tmp_path, accumulate):
    """N steps + resume to 2N gives exactly the adapters of 2N straight (dropout on, same data order)."""
    L.seed_everything(0)
    module, data = make(tiny_chat_llama_dir)
    trainer(tmp_path / "straight", max_steps=6, every=3, accumulate_grad_batches=accumulate).fit(module, data)
    straight = adapter_state_dict(module.model)

    L.seed_everything(0)
    module, data = make(tiny_chat_llama_dir)
    trainer(tmp_path / "cut", max_steps=3, every=3, accumulate_grad_batches=accumulate).fit(module, data)
    L.seed_everything(123)  # a resumed process starts from another RNG state: the checkpoint must restore it
    module, data = make(tiny_chat_llama_dir)
    trainer(tmp_path / "cut", max_steps=6, every=3, accumulate_grad_batches=accumulate).fit(
        module, data, ckpt_path=tmp_path / "cut" / "checkpoints" / "step=3.ckpt")
    resumed = adapter_state_dict(module.model)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_checkpoint_of_another_lora_config_is_a_clear_error(tiny_chat_llama_dir, tmp_path):
    module, data = make(tiny_chat_llama_dir)
    trainer(tmp_path, max_steps=2).fit(module, data)
    other = QLoRAModule(str(tiny_chat_llama_dir), quant=FP32, lora=LoraSpec(r=8, target_modules=("q_proj",)))
    with pytest.raises(KeyError, match="do not match the model"):
        other.on_load_checkpoint(torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False))


@pytest.mark.parametrize("compile_layers", [False, True])
def test_validate_test_and_predict_run_on_the_held_out_split(tiny_chat_llama_dir, tmp_path, compile_layers):
    module, data = make(tiny_chat_llama_dir)
    module.predict_max_new_tokens, module.compile_layers = 4, compile_layers
    t = L.Trainer(default_root_dir=tmp_path, precision="32-true", accelerator="cpu", limit_val_batches=2,
                  limit_test_batches=2, limit_predict_batches=1, enable_progress_bar=False, logger=False)
    (val,) = t.validate(module, data)
    (test,) = t.test(module, data)
    assert val["val/loss"] == pytest.approx(test["test/loss"]) and val["val/perplexity"] > 1
    (rows,) = t.predict(module, data)
    assert len(rows) == 8 and all(r["prompt"].rstrip().endswith("### Assistant:") for r in rows)
    assert all(isinstance(r["answer"], str) and r["reference"] for r in rows)
    torch._dynamo.reset()


def test_loss_on_labelled_positions_equals_transformers_loss(tiny_chat_llama_dir):
    module, data = make(tiny_chat_llama_dir, dropout=0.0)
    module.configure_model()
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    loss, n = module.loss_on(batch)
    ref = module.model(**batch).loss  # shifts and ignores -100 itself, over the full logits
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert n == (batch["labels"][:, 1:] != -100).sum() > 0
    loss.backward()
    assert all(p.grad is not None for n_, p in module.model.named_parameters() if p.requires_grad)


def loss_and_grads(base, *, compile_layers, dropout, gradient_checkpointing=True, device="cpu", seed=1):
    module, data = make(base, dropout=dropout)
    module.compile_layers, module.gradient_checkpointing = compile_layers, gradient_checkpointing
    if device != "cpu":  # the GPU recipe: bf16 compute
        module.quant = QuantSpec(compute_dtype="bfloat16")
    module.to(device).configure_model()
    torch.manual_seed(0)
    for p in module.model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # B = 0 would hide differences in the LoRA path
    data.setup("fit")
    batch = {k: v.to(device) for k, v in next(iter(data.val_dataloader())).items()}
    torch.manual_seed(seed)  # the dropout masks' seed
    loss, _ = module.loss_on(batch)
    loss.backward()
    return loss.detach(), [p.grad for p in module.model.parameters() if p.requires_grad]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_compiled_layers_give_the_uncompiled_loss_and_gradients(tiny_chat_llama_dir, device):
    loss_a, grads_a = loss_and_grads(tiny_chat_llama_dir, compile_layers=False, dropout=0.0, device=device)
    loss_b, grads_b = loss_and_grads(tiny_chat_llama_dir, compile_layers=True, dropout=0.0, device=device)
    # fp32 on CPU: summation order only; bf16 on CUDA: fused kernels round once where eager rounds per op.
    tol = dict(rtol=1e-5, atol=1e-6) if device == "cpu" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss_b, loss_a, **tol)
    for a, b in zip(grads_a, grads_b):
        assert (b.float() - a.float()).norm() <= (5e-5 if device == "cpu" else 3e-2) * a.float().norm()
    torch._dynamo.reset()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_compiled_dropout_is_redrawn_identically_when_checkpointing_recomputes(tiny_chat_llama_dir, device):
    """Compiled layers draw their own dropout masks; recomputation in backward must draw the same ones."""
    kept = loss_and_grads(tiny_chat_llama_dir, compile_layers=True, dropout=0.3, gradient_checkpointing=False,
                          device=device)
    torch._dynamo.reset()
    recomputed = loss_and_grads(tiny_chat_llama_dir, compile_layers=True, dropout=0.3, device=device)
    torch._dynamo.reset()
    no_dropout = loss_and_grads(tiny_chat_llama_dir, compile_layers=True, dropout=0.0, device=device)
    torch._dynamo.reset()
    other_masks = loss_and_grads(tiny_chat_llama_dir, compile_layers=True, dropout=0.3, device=device, seed=2)
    torch._dynamo.reset()

    def grad_gap(a, b):
        return max(((y.float() - x.float()).norm() / x.float().norm()).item() for x, y in zip(a[1], b[1]))

    assert grad_gap(kept, other_masks) > 0.1  # what redrawing other masks would do
    if device == "cpu":
        assert torch.equal(kept[0], recomputed[0]) and all(torch.equal(a, b) for a, b in zip(kept[1], recomputed[1]))
    else:  # with and without checkpointing Inductor fuses differently, and bf16 rounds accordingly
        torch.testing.assert_close(recomputed[0], kept[0], rtol=1e-3, atol=0)
        assert grad_gap(kept, recomputed) <= 3e-2
    assert not torch.equal(kept[0], no_dropout[0])  # dropout is really on
