"""Loading a Hugging Face causal LM straight into its QLoRA form (4-bit base + LoRA), module by module: the
one loader, for training, evaluation, generation and FSDP.

The skeleton is built on the meta device with its LoRA layers and frozen 4-bit linears in place
(`inject.inject_lora`); then each module is given its tensors (`ModuleMaterializer`): a frozen linear's weight
is read from the safetensors shards and quantized on the training device, LoRA factors are initialised or taken
from an adapter, and every other tensor (embeddings, norms, output head) is placed in the compute dtype.
Nothing full-size is ever built: peak host memory is about one tensor of the checkpoint, peak device memory the
4-bit model plus one bf16 weight. Under FSDP the same loader runs unit by unit as FSDP shards the model
(`fsdp.QLoRAFSDPStrategy`).
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from . import adapters, hub
from .attention import use_varlen_attention
from .checkpoint_files import CheckpointTensors, weights_fingerprint
from .inject import inject_lora
from .lora import FrozenLinear, LoraLinear, lora_layers
from .offload import offloaded_checkpoint
from .specs import LoraSpec, QuantSpec, torch_dtype
from .tokenizer import load_tokenizer


class LoadedModel(NamedTuple):
    """What `load_model` returns: the model with LoRA layers (`lora.lora_layers` lists them), its tokenizer,
    what gives the modules their tensors (used when loading with `materialize=False`), and the base weights'
    `weights_fingerprint` (`random:<shape>` for random ones)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    materialize: ModuleMaterializer
    fingerprint: str

    def text_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, for the commands that read and write text; a `random:<shape>` base has none."""
        if self.tokenizer is None:
            raise ValueError(
                f"{self.fingerprint}: random weights come without a tokenizer; give a checkpoint folder or hub id"
            )
        return self.tokenizer


def build_skeleton(config, dtype: torch.dtype, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model with every parameter on the meta device (no memory) and buffers (RoPE) real, on the CPU."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model


#: LLaMA-2 shapes for `random:<size>` models: benchmarks build them with random weights directly in
#: 4-bit on the device, so a 70B shape needs no 140 GB checkpoint on disk. `tiny` is for tests.
RANDOM_SHAPES: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
    ),
    "70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
}
RANDOM_PREFIX = "random:"


class RandomTensors:
    """Random weights for `random:<shape>` models, made on `device`: N(0, 0.02) matrices (LLaMA's init) and
    ones for 1-D tensors (norms). Each key has its own seed, so every rank makes the same model."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype

    def __contains__(self, key: str) -> bool:
        return True

    def __call__(self, key: str, shape: torch.Size) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, device=self.device, dtype=self.dtype)
        g = torch.Generator(self.device).manual_seed(zlib.crc32(key.encode()))
        return torch.randn(shape, device=self.device, dtype=self.dtype, generator=g).mul_(0.02)


TensorSource = CheckpointTensors | RandomTensors


class ModuleMaterializer:
    """Gives the modules of a meta-device QLoRA model their real tensors on `device`, one module at a time:
    a frozen base linear is quantized from its checkpoint weight, LoRA factors are initialised fresh (or
    copied from `adapter`), and every other parameter is copied in the compute dtype.

    `load_model` calls it on every module. Under FSDP it is the `param_init_fn` that FSDP calls on the
    modules of each shard unit just before sharding that unit, so no rank ever holds the whole model,
    on its GPU or on the host. Modules it does not know (those outside the model) are left alone.
    """

    def __init__(
        self,
        model: nn.Module,
        tensors: TensorSource,
        device: torch.device,
        dtype: torch.dtype,
        adapter: dict[str, torch.Tensor] | None = None,
    ):
        self.names = {module: name for name, module in model.named_modules()}
        self.tensors, self.device, self.dtype, self.adapter = tensors, device, dtype, adapter
        # Tied parameters (an output head sharing the embedding) are one parameter in several modules: made
        # once, from whichever key the checkpoint holds, and given to all of them at once.
        self.tied: dict[str, str] = {}  # key → the tied group's key in the checkpoint
        self.tied_places: dict[str, list[tuple[nn.Module, str]]] = {}  # that key → (module, attribute) of each
        groups: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for name, module in model.named_modules():
            for attr, p in module.named_parameters(recurse=False):
                groups.setdefault(id(p), []).append((f"{name}.{attr}" if name else attr, module, attr))
        for group in (g for g in groups.values() if len(g) > 1):
            canonical = next((key for key, _, _ in group if key in tensors), group[0][0])
            self.tied.update((key, canonical) for key, _, _ in group)
            self.tied_places[canonical] = [(module, attr) for _, module, attr in group]

    @staticmethod
    def checkpoint_key(module_name: str) -> str:
        """A module's name in the checkpoint: a LoRA layer's frozen base is the original linear."""
        return module_name.removesuffix(".base_layer")

    def missing(self, model: nn.Module) -> list[str]:
        """The checkpoint keys the model needs and the source lacks (one per tied group)."""
        needed: set[str] = set()
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                continue  # its factors are not in the checkpoint; its base is a module of its own
            prefix = f"{self.checkpoint_key(name)}." if name else ""
            needed.update(
                self.tied.get(prefix + attr, prefix + attr) for attr, _ in module.named_parameters(recurse=False)
            )
        return sorted(k for k in needed if k not in self.tensors)

    @torch.no_grad()
    def __call__(self, module: nn.Module) -> None:
        name = self.names.get(module)
        if name is None:
            return
        prefix = f"{name}." if name else ""
        if isinstance(module, FrozenLinear):
            if module.weight.is_meta:
                key = self.checkpoint_key(name)
                weight = self.tensors(f"{key}.weight", torch.Size((module.out_features, module.in_features)))
                bias = None if module.bias is None else self.tensors(f"{key}.bias", torch.Size((module.out_features,)))
                module.load_dense(weight, bias, self.device)
        elif isinstance(module, LoraLinear):
            if module.lora_A.is_meta:
                values = (
                    None if self.adapter is None else {ab: self.adapter[f"{name}.{ab}"] for ab in ("lora_A", "lora_B")}
                )
                module.materialize_lora(self.device, values)
        else:
            for attr, p in module.named_parameters(recurse=False):
                if p.is_meta:
                    key = self.tied.get(prefix + attr, prefix + attr)
                    # a copy, so that nothing aliases the checkpoint file's memory map
                    value = self.tensors(key, p.shape).to(self.device, self.dtype, copy=True)
                    made = nn.Parameter(value, requires_grad=False)
                    for owner, owner_attr in self.tied_places.get(key, [(module, attr)]):
                        setattr(owner, owner_attr, made)
        for attr, buf in module.named_buffers(recurse=False):
            setattr(module, attr, buf.to(self.device))


def resolve_device(device: str | torch.device) -> torch.device:
    """`"auto"` → the first CUDA device when there is one, else the CPU; anything else as torch reads it, checked
    to exist here: torch itself fails only at the first tensor moved there, with a message about its build (a CPU
    build's "Torch not compiled with CUDA enabled" AssertionError) that does not name the `--device` flag."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(
            f"--device {device!r} is not a device torch knows ({e}); use auto, cpu, cuda or cuda:N"
        ) from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"--device {device!r}: {why}; use --device cpu (or auto, which picks CUDA when present)")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(
                f"--device {device!r}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1})"
            )
    return resolved


def load_model(
    name_or_path: str,
    *,
    quant: QuantSpec = QuantSpec(),
    lora: LoraSpec | None = LoraSpec(),
    adapter: str | os.PathLike | None = None,
    allow_other_base: bool = False,
    device: torch.device | str = "cpu",
    materialize: bool = True,
    gradient_checkpointing: bool = True,
    offload_activations: bool = False,
    offload_outputs: Sequence[str] = (),
    train_mode: bool = True,
    with_tokenizer: bool = True,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM (hub id or local folder of safetensors) directly into its QLoRA form on `device`.

    Training uses the defaults (fresh adapters of `lora`, train mode, gradient checkpointing); evaluation and
    generation pass `adapter` with `lora=None` (the adapter's own rank, scale and targets, read from its
    adapter_config.json), `train_mode=False` and `gradient_checkpointing=False`.

    Args:
        name_or_path: hub id (e.g. "meta-llama/Llama-2-7b-hf"), a local folder as `save_pretrained`
            writes, `builtin:smollm2-135m-instruct`, or `random:7b|13b|70b|tiny` (random LLaMA-2-shaped
            weights made on the device, for benchmarks; no tokenizer).
        quant: how the frozen base is stored (NF4 + double quant + bf16 compute by default).
        lora: the adapters' layout. Fresh adapters (B = 0) leave the output exactly that of the 4-bit base.
            None: the layout of `adapter`, or no adapters at all without one (the quantized base alone).
        adapter: a PEFT adapter folder to start the LoRA factors from instead of fresh ones, checked against the
            layout and the base (`adapters.validate`, `adapters.check_adapter_base`).
        allow_other_base: skip the check that the adapter was trained on this base (the same weights under a
            name the check cannot recognise).
        device: where the model is quantized and lives; each rank passes its own (never a device map,
            which under DDP would put every rank's model on one GPU).
        materialize: give every module its tensors now. False leaves all parameters on the meta device and
            `LoadedModel.materialize` to do it module by module: FSDP's `param_init_fn`, which loads each shard
            unit just before sharding it.
        gradient_checkpointing: recompute activations in backward (non-reentrant), the paper's setting:
            it is what lets 65B fit one 48 GB GPU. Off: the KV cache is on, for generation.
        offload_activations: with `gradient_checkpointing`, keep each layer's input in pinned host memory
            until backward instead of on the device (`offload.offloaded_checkpoint`).
        offload_outputs: with `offload_activations`, the projections (name suffixes, e.g. "self_attn.o_proj") whose
            forward output waits in pinned host memory too, so that the recomputation reuses it instead of redoing
            their frozen matmul (`enable_gradient_checkpointing`).
        train_mode: leave the model in train mode (a loaded model starts in eval mode, which would
            silently disable gradient checkpointing and dropout under Lightning).
        with_tokenizer: also load the tokenizer (see `load_tokenizer`).
        trust_remote_code: run modelling code shipped with the checkpoint; off unless the user asks.
        revision: the hub revision (branch, tag or commit) to fetch.
    """
    device = torch.device(device)
    dtype = torch_dtype(quant.compute_dtype)
    config, checkpoint_dir, fingerprint = _base_config(name_or_path, revision, trust_remote_code)
    found = adapters.read_adapter(adapter) if adapter is not None else None
    if found is not None and lora is None:
        lora = adapters.lora_spec(found.config, str(found.folder / adapters.ADAPTER_CONFIG))
    model = build_skeleton(config, dtype, trust_remote_code=trust_remote_code)
    use_varlen_attention(model)  # packed rows attend per example, without a dense mask; padded batches as sdpa
    model.tie_weights()
    tensors: RandomTensors | CheckpointTensors
    if checkpoint_dir is None:
        tensors = RandomTensors(device, dtype)
    else:
        expected = {k for k, _ in model.named_parameters(remove_duplicate=False)}
        tensors = CheckpointTensors(checkpoint_dir, expected, type(model).__name__)
    inject_lora(model, lora, quant)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_A", ".lora_B")))
    if found is not None:
        if not allow_other_base:
            adapters.check_adapter_base(found, base_model=name_or_path, base_fingerprint=fingerprint)
        adapters.validate(lora_layers(model), found.state, source=str(found.folder), config=found.config)
    materializer = ModuleMaterializer(model, tensors, device, dtype, found.state if found is not None else None)
    if missing := materializer.missing(model):
        raise KeyError(f"{name_or_path}: the checkpoint lacks {missing[:8]}{' …' if len(missing) > 8 else ''}")

    _set_mode(
        model,
        gradient_checkpointing=gradient_checkpointing,
        offload=offload_activations,
        offload_outputs=offload_outputs,
        train=train_mode,
    )
    if materialize:
        for module in model.modules():
            materializer(module)
    with_tokenizer = with_tokenizer and checkpoint_dir is not None  # random weights come without a tokenizer
    tokenizer = load_tokenizer(str(checkpoint_dir), trust_remote_code=trust_remote_code) if with_tokenizer else None
    return LoadedModel(model, tokenizer, materializer, fingerprint)


def _set_mode(
    model: PreTrainedModel, *, gradient_checkpointing: bool, offload: bool, offload_outputs: Sequence[str], train: bool
) -> None:
    """Training's mode (checkpointing, optionally offloaded; no KV cache) or generation's (the KV cache on)."""
    model.config.use_cache = not gradient_checkpointing
    if offload and not gradient_checkpointing:
        raise ValueError("offload_activations offloads the inputs that gradient checkpointing keeps: turn on both")
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, offload=offload, offload_outputs=offload_outputs)
    elif offload_outputs:
        raise ValueError("offload_outputs are reused by offloaded checkpointing: turn on gradient_checkpointing")
    model.train(train)


def _base_config(
    name_or_path: str, revision: str | None, trust_remote_code: bool
) -> tuple[PretrainedConfig, Path | None, str]:
    """(config, checkpoint folder, weights fingerprint) of the base: a `random:<shape>` has no folder and its
    name as fingerprint; a checkpoint that is already quantized is refused (QLoRA quantizes a 16/32-bit one)."""
    if name_or_path.startswith(RANDOM_PREFIX):
        from transformers import LlamaConfig

        shape = name_or_path[len(RANDOM_PREFIX) :]
        if shape not in RANDOM_SHAPES:
            raise ValueError(f"unknown random shape {shape!r}; choose one of {sorted(RANDOM_SHAPES)}")
        return LlamaConfig(**RANDOM_SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5), None, name_or_path
    checkpoint_dir = hub.checkpoint_dir(name_or_path, revision=revision)
    fingerprint = weights_fingerprint(checkpoint_dir)
    config = AutoConfig.from_pretrained(checkpoint_dir, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(
            f"{name_or_path} is already quantized ({config.quantization_config}); "
            "QLoRA needs a 16/32-bit checkpoint to quantize"
        )
    return config, checkpoint_dir, fingerprint


def load_for_inference(
    base: str,
    adapter: str | os.PathLike | None = None,
    *,
    quant: QuantSpec = QuantSpec(),
    device: str | torch.device = "auto",
    allow_other_base: bool = False,
) -> LoadedModel:
    """`load_model` as evaluation and generation want it: the adapter's own layout (or the quantized base alone
    without one), eval mode, the KV cache on, no checkpointing, on `device` ("auto": CUDA if present)."""
    return load_model(
        base,
        quant=quant,
        lora=None,
        adapter=adapter,
        allow_other_base=allow_other_base,
        device=resolve_device(device),
        gradient_checkpointing=False,
        train_mode=False,
    )


#: Per model type, the projections whose output only joins the residual stream: the decoder layer adds it to the
#: residual and returns the sum, so no backward inside the layer reads its value. Offloaded checkpointing skips
#: their frozen matmul when it recomputes a layer (`LoraLinear.skip_base_on_recompute`). Gemma 2/3 are not here:
#: they normalise the MLP's output (`post_feedforward_layernorm`), whose backward reads it. A family is added only
#: with `tests/test_families.py` passing for it (compiled and offloaded layers give the plain gradients).
RESIDUAL_ONLY_OUTPUTS: dict[str, tuple[str, ...]] = {
    family: ("mlp.down_proj",) for family in ("llama", "mistral", "qwen2", "qwen3", "phi3")
}


def enable_gradient_checkpointing(
    model: PreTrainedModel, *, offload: bool = False, offload_outputs: Sequence[str] = ()
) -> None:
    """Activation checkpointing per decoder layer (non-reentrant), under either transformers API name; with
    `offload`, each layer's input waits in pinned host memory until backward (`offload.offloaded_checkpoint`),
    the LoRA layers of `RESIDUAL_ONLY_OUTPUTS` skip their frozen matmul when it recomputes them, and those named by
    `offload_outputs` (name suffixes) keep their forward output there too, for the recomputation to reuse
    (`LoraLinear.reuse_output_on_recompute`; a residual-only projection needs none: it is skipped either way).

    transformers gives no public way to choose the checkpointing function: it calls the
    `_gradient_checkpointing_func` it sets on each module with a `gradient_checkpointing` flag, as
    `layer._gradient_checkpointing_func(forward, *args)` (checked on transformers 5.17-5.24); that attribute is
    replaced here and nowhere else.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # the GPU image's transformers 5.17 and 4.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if offload_outputs and not offload:
        raise ValueError("offload_outputs wait in host memory with the layer inputs: turn on offload_activations")
    if not offload:
        return
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            # torch types a module's attributes as tensors or modules (`Module.__setattr__`); this is a function
            module._gradient_checkpointing_func = offloaded_checkpoint  # type: ignore[assignment]
    layers = lora_layers(model)
    for suffix in offload_outputs:
        if not any(name.endswith("." + suffix) for name in layers):
            found = sorted({re.sub(r"^.*\.layers\.\d+\.", "", name) for name in layers})
            raise ValueError(f"offload_outputs: {suffix!r} names no LoRA layer of this model; its projections: {found}")
    residual_only = tuple("." + s for s in RESIDUAL_ONLY_OUTPUTS.get(model.config.model_type, ()))
    kept = tuple("." + s for s in offload_outputs)
    for name, layer in layers.items():
        layer.skip_base_on_recompute = name.endswith(residual_only)
        layer.reuse_output_on_recompute = name.endswith(kept) and not layer.skip_base_on_recompute
