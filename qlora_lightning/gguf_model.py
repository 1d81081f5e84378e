"""GGUF model files: llama.cpp's LLaMA metadata and tensors, for the merged model and for a LoRA adapter.

The `gguf` package (maintained with llama.cpp) does the file format, the tensor names (`TensorNameMap`) and the
quantization (`gguf.quants`); what llama.cpp expects beyond the format lives here:
- Q and K rows are reordered per head: Hugging Face pairs RoPE dimensions i and i + d/2 within a head,
  llama.cpp's LLaMA graph pairs 2i and 2i + 1 (`_llama_rope_rows`). A LoRA's B follows its weight's rows.
- a LoRA's `lora_a` is PEFT's A (r × in) and `lora_b` its B (out × r), unscaled; llama.cpp adds
  `lora_b @ lora_a * adapter.lora.alpha / r`, r read from the tensors.
- 1-D tensors (norms) are f32, as llama.cpp's converter writes them.

Writing streams (`write_gguf`): every tensor's name, shape and type goes into the header first, then the tensors
are converted and written one at a time, so memory holds one tensor (plus its float32 copy while quantizing), never
the model. The file is written under a temporary name beside its final one and renamed into place
(`atomic.write_file`): a killed export leaves no half file under the final name. Llama-architecture models
(LLaMA, LLaMA-2, SmolLM2) are supported; any other architecture is an error that says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch
from transformers import AutoConfig

from .adapters import Adapter
from .atomic import write_file
from .merge import check_adapted_modules, lora_factors

__all__ = [
    "FILE_TYPES",
    "LORA_TYPES",
    "LlamaShape",
    "Planned",
    "llama_shape",
    "add_llama_metadata",
    "to_llama_layout",
    "model_plan",
    "lora_plan",
    "new_writer",
    "checked_file_type",
    "new_lora_writer",
    "write_gguf",
]

Q = gguf.GGMLQuantizationType
#: `--gguf_type` → (the type of 2-D tensors, the file type llama.cpp reports).
FILE_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
#: The types a GGUF LoRA is written in: its rank-r factors are small, and r (their row length in lora_b) is
#: rarely a multiple of the 32-wide quantization blocks.
LORA_TYPES = ("f16", "bf16")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
#: Checkpoint tensors that carry nothing llama.cpp needs (RoPE frequencies come from the metadata).
_SKIPPED = re.compile(r"\.rotary_emb\.inv_freq$")


# ------------------------------------------------------------------------------------------ architecture
@dataclass(frozen=True)
class LlamaShape:
    """What llama.cpp's LLaMA graph needs to know about a checkpoint, read from its config.json."""

    context_length: int
    embedding_length: int
    feed_forward_length: int
    block_count: int
    head_count: int
    head_count_kv: int
    head_dim: int
    rope_theta: float
    rope_linear_factor: float | None
    rms_norm_eps: float
    vocab_size: int


def _rope(config) -> tuple[float, str, dict]:
    """(base frequency, scaling type, scaling parameters) under transformers 5's `rope_parameters` or 4's
    `rope_theta` + `rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params.get("rope_type", params.get("type", "default")), params


def llama_shape(source_dir: Path) -> LlamaShape:
    """The `LlamaShape` of a checkpoint folder; a clear error for any architecture or option llama.cpp's LLaMA
    graph would run differently (which would give a file that loads but answers wrongly)."""
    config = AutoConfig.from_pretrained(source_dir)
    where = source_dir / "config.json"
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{where}: architecture {architecture!r} cannot be exported to GGUF; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (LLaMA, LLaMA-2, SmolLM2 and other Llama-architecture models). "
            "Export it with --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    theta, rope_type, params = _rope(config)
    if rope_type not in ("default", "linear"):
        raise ValueError(
            f"{where}: RoPE scaling {rope_type!r} is not supported by the GGUF export (only none or 'linear')"
        )
    heads = config.num_attention_heads
    return LlamaShape(
        context_length=config.max_position_embeddings,
        embedding_length=config.hidden_size,
        feed_forward_length=config.intermediate_size,
        block_count=config.num_hidden_layers,
        head_count=heads,
        head_count_kv=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        rope_theta=theta,
        rope_linear_factor=float(params["factor"]) if rope_type == "linear" else None,
        rms_norm_eps=config.rms_norm_eps,
        vocab_size=config.vocab_size,
    )


def add_llama_metadata(writer: gguf.GGUFWriter, shape: LlamaShape) -> None:
    """The `llama.*` keys llama.cpp reads to build the graph."""
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.embedding_length)
    writer.add_feed_forward_length(shape.feed_forward_length)
    writer.add_block_count(shape.block_count)
    writer.add_head_count(shape.head_count)
    writer.add_head_count_kv(shape.head_count_kv)
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim != shape.embedding_length // shape.head_count:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    if shape.rope_linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(shape.rope_linear_factor)
    writer.add_layer_norm_rms_eps(shape.rms_norm_eps)
    writer.add_vocab_size(shape.vocab_size)


def _llama_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows (output features) of a Q or K projection from Hugging Face's RoPE pairing to llama.cpp's.

    Within each head, HF rotates dimension i with i + d/2 ("rotate half"); llama.cpp's LLaMA graph rotates 2i
    with 2i + 1. Row i of a head moves to 2i and row i + d/2 to 2i + 1, so both compute the same attention.
    Works on a weight (out × in), a bias (out) and a LoRA's B (out × r) alike.
    """
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def to_llama_layout(name: str, tensor: torch.Tensor, shape: LlamaShape) -> torch.Tensor:
    """`tensor` (named as in the GGUF, `.lora_b` included) in the row order llama.cpp expects."""
    if ".attn_q." in name and not name.endswith(".lora_a"):
        return _llama_rope_rows(tensor, shape.head_count)
    if ".attn_k." in name and not name.endswith(".lora_a"):
        return _llama_rope_rows(tensor, shape.head_count_kv)
    return tensor


# ---------------------------------------------------------------------------------------------- tensors
class Planned(NamedTuple):
    """One tensor of a GGUF file before its data is computed: the checkpoint key it comes from, its GGUF name,
    its shape (PyTorch order: rows first) and the type it is stored in."""

    key: str
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType


def _storage_type(name: str, shape: tuple[int, ...], gguf_type: str, output_matrix: str) -> gguf.GGMLQuantizationType:
    """The type a tensor is stored in under `gguf_type`.

    1-D tensors are f32 (llama.cpp's norms). Under q4_0 the output matrix (`output_matrix`: `output.weight`, or
    the embedding when the head is tied to it) stays q8_0: it is the matrix most sensitive to rounding, and
    llama.cpp's own quantizer keeps it above 4 bits too (in q6_K, which the gguf package cannot write). A row that
    is not a whole number of quantization blocks falls back to f16, as llama.cpp's converter does.
    """
    if len(shape) == 1:
        return Q.F32
    qtype = FILE_TYPES[gguf_type][0]
    if qtype == Q.Q4_0 and name == output_matrix:
        qtype = Q.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return Q.F16 if shape[-1] % block else qtype


def _encode(tensor: torch.Tensor, planned: Planned) -> np.ndarray:
    """The bytes of `tensor` as GGUF stores them in `planned.qtype` (a float array, or uint8 rows of blocks)."""
    qtype = planned.qtype
    if qtype == Q.F32:
        return tensor.float().numpy()
    if qtype == Q.F16:
        half = tensor.to(torch.float16)
        if not torch.isfinite(half).all():  # bf16 reaches 3e38, f16 only 65504
            raise ValueError(f"{planned.name} ({planned.key}) holds values beyond float16's range; use gguf_type bf16")
        return half.numpy()
    if qtype == Q.BF16:  # bf16 bits as they are: numpy has no bfloat16
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(tensor.float().numpy(), qtype)


def _add_tensor_info(writer: gguf.GGUFWriter, planned: Planned) -> None:
    """Declare a tensor in the header before its data exists (what lets the data be streamed afterwards)."""
    if planned.qtype in (Q.F32, Q.F16):
        dtype = np.float32 if planned.qtype == Q.F32 else np.float16
        nbytes = math.prod(planned.shape) * np.dtype(dtype).itemsize
        writer.add_tensor_info(planned.name, planned.shape, np.dtype(dtype), nbytes)
    else:
        byte_shape = gguf.quant_shape_to_byte_shape(planned.shape, planned.qtype)
        writer.add_tensor_info(
            planned.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=planned.qtype
        )


def write_gguf(path: Path, writer: gguf.GGUFWriter, plan: list[Planned], tensors: Iterator[torch.Tensor]) -> Path:
    """Write the header, metadata and tensor table of `writer`, then `tensors` (in `plan`'s order) one at a
    time, atomically to `path`, with a progress bar."""
    from tqdm.auto import tqdm

    for planned in plan:
        _add_tensor_info(writer, planned)

    def write(tmp: Path) -> None:
        writer.write_header_to_file(path=tmp)
        try:
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with tqdm(total=len(plan), desc=f"writing {path.name}", unit="tensor") as bar:
                for planned, tensor in zip(plan, tensors, strict=True):
                    writer.write_tensor_data(_encode(tensor, planned))
                    bar.update()
        finally:
            writer.close()

    return write_file(path, write)


def _gguf_name(names: gguf.TensorNameMap, key: str, where: Path) -> str:
    """The GGUF name of a checkpoint key (`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`)."""
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise KeyError(f"{where}: tensor {key!r} has no place in llama.cpp's LLaMA layout")
    return name


def _tensor_order(name: str) -> tuple[int, str]:
    """Embedding first, then the blocks in order, then the final norm and head, as llama.cpp's converter writes."""
    block = re.match(r"blk\.(\d+)\.", name)
    return (int(block[1]) if block else (-1 if name.startswith("token_embd") else 1 << 30)), name


def model_plan(source_dir: Path, shapes: dict[str, tuple], shape: LlamaShape, gguf_type: str) -> list[Planned]:
    """Every tensor of the merged model, in file order, with its GGUF name and storage type."""
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, shape.block_count)
    named = {key: _gguf_name(names, key, source_dir) for key in shapes if not _SKIPPED.search(key)}
    output = "output.weight" if "output.weight" in named.values() else "token_embd.weight"
    plan = [
        Planned(key, name, shapes[key], _storage_type(name, shapes[key], gguf_type, output))
        for key, name in named.items()
    ]
    return sorted(plan, key=lambda p: _tensor_order(p.name))


# --------------------------------------------------------------------------------------------- writers
def new_writer(name: str, file_type: gguf.LlamaFileType, kind: str) -> gguf.GGUFWriter:
    """A writer with the keys every file shares: architecture, type ("model" or "adapter"), name (`model_name`),
    file type."""
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(kind)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return writer


def new_lora_writer(name: str, file_type: gguf.LlamaFileType, alpha: float) -> gguf.GGUFWriter:
    """A writer for a LoRA adapter: `new_writer`'s keys, then `adapter.type` = "lora" and `adapter.lora.alpha`."""
    writer = new_writer(name, file_type, "adapter")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    return writer


def checked_file_type(gguf_type: str, what: str = "a GGUF model", allowed: tuple[str, ...] = tuple(FILE_TYPES)):
    """The `gguf.LlamaFileType` of `gguf_type`, or an error naming the types `what` can be written in."""
    if gguf_type not in allowed:
        raise ValueError(f"gguf_type {gguf_type!r} is not one {what} is written in; choose one of {', '.join(allowed)}")
    return FILE_TYPES[gguf_type][1]


def lora_plan(
    source_dir: Path, adapter: Adapter, shapes: dict[str, tuple], shape: LlamaShape, gguf_type: str
) -> list[tuple[Planned, torch.Tensor]]:
    """(planned tensor, its data) of every LoRA factor: `<name>.lora_a` = A (r × in), `<name>.lora_b` = B
    (out × r, rows in llama.cpp's order), as llama.cpp checks them against the base tensor `<name>`."""
    factors = lora_factors(adapter)
    check_adapted_modules(source_dir, factors, shapes)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, shape.block_count)
    qtype = FILE_TYPES[gguf_type][0]
    tensors = []
    for module, (lora_A, lora_B, _) in factors.items():
        name = _gguf_name(names, f"{module}.weight", source_dir)
        for suffix, factor in ((".lora_a", lora_A), (".lora_b", lora_B)):
            planned = Planned(f"{module}.{suffix[1:]}", name + suffix, tuple(factor.shape), qtype)
            tensors.append((planned, to_llama_layout(planned.name, factor, shape)))
    return sorted(tensors, key=lambda t: _tensor_order(t[0].name))
