"""Loading a Hugging Face causal LM straight into its QLoRA form (4-bit base + LoRA), shard by shard.

The skeleton is built on the meta device; the safetensors shards are then read tensor by tensor, each
target linear is quantized on the training device as it arrives and wrapped in a LoRA layer, and every
other tensor (embeddings, norms, output head) is placed in bf16. Nothing full-size is ever built: peak
host memory is about one tensor of the checkpoint, peak device memory the 4-bit model plus one bf16 weight.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from . import builtin
from .lora import QuantType, lora_layer_class, lora_layer_kwargs, matches_target, quantize_linear
from .tokenizer import load_tokenizer

DTypeName = Literal["bfloat16", "float16", "float32"]


@dataclass(frozen=True)
class QuantSpec:
    """How the frozen base is stored.

    quantize: "nf4" (the paper's 4-bit NormalFloat, information-theoretically optimal for normally
        distributed weights), "fp4", or "none" (bf16 base: the paper's 16-bit LoRA comparison).
    double_quant: also quantize the quantization constants (paper: saves ~0.37 bit/parameter, 3 GB at 65B).
    compute_dtype: dtype of the matmuls, of the LoRA weights and of the unquantized parameters; bf16 as in
        the paper. CPUs without native bf16 matmul (AVX2 only) run bf16 matmuls 4-90x slower than float32: use
        float32 there (the CPU demo does).
    quant_storage: dtype the packed 4-bit bytes are stored in; set it to the other parameters' dtype
        (bfloat16) to let FSDP shard the 4-bit weights with the rest.
    """

    quantize: QuantType = "nf4"
    double_quant: bool = True
    compute_dtype: DTypeName = "bfloat16"
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"


@dataclass(frozen=True)
class LoraSpec:
    """Which layers get adapters and how large they are.

    r: rank of A/B; the paper uses 64 at every size (and finds rank matters little when all layers get LoRA).
    alpha: the update is scaled by alpha / r; 16 as in the paper and the OpenOrca adapters.
    dropout: dropout on the LoRA input; paper: 0.1 for 7B/13B, 0.05 for 33B/65B.
    target_modules: "all-linear" (the paper: LoRA on every linear layer is needed to match 16-bit
        fine-tuning) or module-name suffixes such as ["q_proj", "v_proj"], or "re:<regex>".
    exclude: suffixes never adapted; the output head stays full precision as in QLoRA.
    """

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: str | tuple[str, ...] = "all-linear"
    exclude: tuple[str, ...] = ("lm_head",)


# Checkpoints record these specs among the module's hyperparameters; they are plain data, so resuming
# may read them with `torch.load(weights_only=True)`, which refuses any other object.
torch.serialization.add_safe_globals([QuantSpec, LoraSpec])


class LoadedModel(NamedTuple):
    """What `load_model` returns: the model with LoRA layers, its tokenizer, and the replaced module names."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    lora_modules: list[str]


def torch_dtype(name: str) -> torch.dtype:
    """`"bfloat16"` → `torch.bfloat16`, with a clear error for anything else."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; expected e.g. 'bfloat16', 'float16', 'float32'")
    return dtype


def resolve_checkpoint_dir(name_or_path: str, *, revision: str | None = None) -> Path:
    """A local folder as is, a `builtin:` model's cached folder, or the hub repo's config and safetensors."""
    name_or_path = builtin.resolve(name_or_path)
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))


def safetensors_shards(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when sharded."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [checkpoint_dir / f for f in sorted(set(weight_map.values()))]
    single = checkpoint_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{checkpoint_dir} has neither model.safetensors nor model.safetensors.index.json; "
                            "only safetensors checkpoints are loaded (pickled .bin files are never unpickled)")


def build_skeleton(config, dtype: torch.dtype, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model with every parameter on the meta device (no memory) and buffers (RoPE) real, on the CPU."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


class _LinearAssembler:
    """Collects a linear's weight (and bias) and, once all have arrived, swaps in its replacement:
    a LoRA layer for LoRA targets, a plain frozen 4-bit linear for the other quantized linears."""

    def __init__(self, model: nn.Module, lora_targets: set[str], quantized: set[str], quant: QuantSpec,
                 lora: LoraSpec, device: torch.device, park_on: torch.device):
        self.model, self.lora_targets, self.device, self.park_on = model, lora_targets, device, park_on
        self.handled = lora_targets | quantized
        self.layer_cls = lora_layer_class(quant.quantize)
        compute, storage = torch_dtype(quant.compute_dtype), torch_dtype(quant.quant_storage)
        self.kwargs = lora_layer_kwargs(quant.quantize, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                        double_quant=quant.double_quant, compute_dtype=compute, quant_storage=storage)
        self.quant_kwargs = dict(quant_type=quant.quantize, double_quant=quant.double_quant, compute_dtype=compute,
                                 quant_storage=storage)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def offer(self, key: str, tensor: torch.Tensor) -> bool:
        """Take `key` if it belongs to a linear this assembler replaces; build it when complete."""
        module_name, _, attr = key.rpartition(".")
        if module_name not in self.handled:
            return False
        parts = self.pending.setdefault(module_name, {})
        parts[attr] = tensor
        linear = self.model.get_submodule(module_name)
        if "weight" in parts and ("bias" in parts or linear.bias is None):
            weight, bias = parts["weight"], parts.get("bias")
            if module_name in self.lora_targets:
                layer = self.layer_cls.from_weight(weight, bias, device=self.device, **self.kwargs)
            else:
                layer = quantize_linear(weight, bias, device=self.device, **self.quant_kwargs)
            if self.park_on != self.device:
                layer = layer.to(self.park_on)  # quantized where it is fast, kept where there is room
            parent_name, _, child = module_name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, layer)
            del self.pending[module_name]
        return True


#: LLaMA-2 shapes for `random:<size>` models: benchmarks build them with random weights directly in
#: 4-bit on the device, so a 70B shape needs no 140 GB checkpoint on disk. `tiny` is for tests.
RANDOM_SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
}
RANDOM_PREFIX = "random:"


def _checkpoint_tensors(checkpoint_dir: Path, expected: set[str], model_name: str):
    """(key, tensor) of every tensor in the folder's safetensors shards, one at a time, on the CPU."""
    for shard in safetensors_shards(checkpoint_dir):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in expected:
                    raise KeyError(f"{shard.name}: tensor {key!r} has no place in {model_name} "
                                   f"(is the folder's config.json the checkpoint's own?)")
                yield key, f.get_tensor(key)


def _random_tensors(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(key, tensor) for every parameter: N(0, 0.02) weights (LLaMA's init), ones for norms; made on `device`."""
    g = torch.Generator(device).manual_seed(seed)
    for key, p in model.named_parameters():
        if p.dim() == 1:
            yield key, torch.ones(p.shape, device=device, dtype=dtype)
        else:
            yield key, torch.randn(p.shape, device=device, dtype=dtype, generator=g).mul_(0.02)


def load_model(name_or_path: str, *, quant: QuantSpec = QuantSpec(), lora: LoraSpec = LoraSpec(),
               device: torch.device | str = "cpu", park_on: torch.device | str | None = None,
               gradient_checkpointing: bool = True, train_mode: bool = True,
               with_tokenizer: bool = True, trust_remote_code: bool = False, revision: str | None = None) -> LoadedModel:
    """Load a causal LM (hub id or local folder of safetensors) directly into its QLoRA form on `device`.

    Args:
        name_or_path: hub id (e.g. "meta-llama/Llama-2-7b-hf"), a local folder as `save_pretrained`
            writes, `builtin:smollm2-135m-instruct`, or `random:7b|13b|70b|tiny` (random LLaMA-2-shaped
            weights made on the device, for benchmarks; no tokenizer).
        quant: how the frozen base is stored (NF4 + double quant + bf16 compute by default).
        lora: the adapters. Fresh adapters (B = 0) leave the output exactly that of the 4-bit base,
            so the same call also serves to evaluate the base model.
        device: where the model is quantized and lives; each rank passes its own (never a device map,
            which under DDP would put every rank's model on one GPU).
        park_on: where each finished layer is kept instead (default: `device`). Under FSDP the CPU: the
            4-bit model then never sits whole on a GPU; FSDP moves it there one shard unit at a time,
            sharding each before the next.
        gradient_checkpointing: recompute activations in backward (non-reentrant), the paper's setting:
            it is what lets 65B fit one 48 GB GPU.
        train_mode: leave the model in train mode (a loaded model starts in eval mode, which would
            silently disable gradient checkpointing and dropout under Lightning).
        with_tokenizer: also load the tokenizer (see `load_tokenizer`).
        trust_remote_code: run modelling code shipped with the checkpoint; off unless the user asks.
    """
    device = torch.device(device)
    dtype = torch_dtype(quant.compute_dtype)
    if name_or_path.startswith(RANDOM_PREFIX):
        from transformers import LlamaConfig

        shape = name_or_path[len(RANDOM_PREFIX):]
        if shape not in RANDOM_SHAPES:
            raise ValueError(f"unknown random shape {shape!r}; choose one of {sorted(RANDOM_SHAPES)}")
        config = LlamaConfig(**RANDOM_SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5)
        checkpoint_dir, with_tokenizer = None, False
    else:
        checkpoint_dir = resolve_checkpoint_dir(name_or_path, revision=revision)
        config = AutoConfig.from_pretrained(checkpoint_dir, trust_remote_code=trust_remote_code)
        if getattr(config, "quantization_config", None) is not None:
            raise ValueError(f"{name_or_path} is already quantized ({config.quantization_config}); "
                             "QLoRA needs a 16/32-bit checkpoint to quantize")
    model = build_skeleton(config, dtype, trust_remote_code=trust_remote_code)

    linear_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = {n for n in linear_names if matches_target(n, lora.target_modules, lora.exclude)}
    if not targets:
        raise ValueError(f"lora.target_modules={lora.target_modules!r} (exclude={lora.exclude!r}) matches no "
                         f"linear layer of {name_or_path}; its linear layers include {sorted(linear_names)[:8]}")
    # Like the model card's load: every linear but the output head is 4-bit, LoRA or not.
    head = model.get_output_embeddings()
    quantized = set() if quant.quantize == "none" else {
        n for n in linear_names if model.get_submodule(n) is not head}
    park_on = torch.device(park_on) if park_on is not None else device
    assembler = _LinearAssembler(model, targets, quantized, quant, lora, device, park_on)

    if checkpoint_dir is None:
        tensors = _random_tensors(model, device, dtype)
    else:
        expected = {k for k, _ in model.named_parameters(remove_duplicate=False)}
        tensors = _checkpoint_tensors(checkpoint_dir, expected, type(model).__name__)
    for key, tensor in tensors:
        if not assembler.offer(key, tensor):
            _set_tensor(model, key, tensor.to(park_on, dtype, copy=True))  # never alias the file's mmap
    if assembler.pending:
        raise KeyError(f"{name_or_path}: incomplete weights for {sorted(assembler.pending)}")

    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise KeyError(f"{name_or_path}: the checkpoint lacks {missing[:8]}{' …' if len(missing) > 8 else ''}")
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(park_on)
    lora_modules = sorted(targets)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_A", ".lora_B")))
    model.config.use_cache = not gradient_checkpointing
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train(train_mode)
    tokenizer = load_tokenizer(str(checkpoint_dir), trust_remote_code=trust_remote_code) if with_tokenizer else None
    return LoadedModel(model, tokenizer, lora_modules)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing per decoder layer, under either transformers API name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # the GPU image's transformers 5.17 and 4.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
