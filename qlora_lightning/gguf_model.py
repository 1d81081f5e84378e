"""GGUF model files: llama.cpp's metadata and tensors for each model family it runs, for the merged model and for a
LoRA adapter.

The `gguf` package (maintained with llama.cpp) does the file format, the tensor names (`TensorNameMap` of each
architecture) and the quantization (`gguf.quants`); what llama.cpp expects beyond the format lives here, one `Family`
per Hugging Face architecture (`FAMILIES`), its facts taken from llama.cpp's `convert_hf_to_gguf.py`:
- LLaMA-architecture models (LLaMA, Llama 3, Mistral, SmolLM2): Q and K rows are reordered per head, since Hugging
  Face pairs RoPE dimensions i and i + d/2 within a head and llama.cpp's LLaMA graph pairs 2i and 2i + 1
  (`_interleave_rope_rows`, the converter's `permute`); a LoRA's B follows its weight's rows. Llama 3's "llama3" RoPE
  scaling becomes the `rope_freqs` tensor (the converter's `generate_extra_tensors`), taken here from transformers'
  own frequencies. Qwen 2/3, Gemma 2/3 and Phi-3 rotate halves as Hugging Face does (llama.cpp's NEOX RoPE): no
  reordering.
- Gemma 2/3 RMSNorm scales by (1 + w); llama.cpp's by w: every norm weight is stored as w + 1 (the converter's
  `data_torch + 1`). Gemma's head is its embedding (tied) and its softcapping/sliding-window values are metadata.
- Phi-3's fused `qkv_proj` and `gate_up_proj` stay fused (`attn_qkv`, `ffn_up`), as llama.cpp's graph splits them.
- a LoRA's `lora_a` is PEFT's A (r x in) and `lora_b` its B (out x r), unscaled; llama.cpp adds
  `lora_b @ lora_a * adapter.lora.alpha / r`, r read from the tensors.
- 1-D tensors (norms, biases, RoPE factors) are f32, as llama.cpp's converter writes them.

A configuration llama.cpp's graph would run differently from transformers (a RoPE scaling it does not read, an
attention scale it hard-codes, sliding windows it ignores) is refused before anything is written, naming the family
and the setting: such a file would load and answer wrongly. Any other architecture is refused the same way.

Writing streams (`write_gguf`): every tensor's name, shape and type goes into the header first, then the tensors
are converted and written one at a time, so memory holds one tensor (plus its float32 copy while quantizing), never
the model. The file is written under a temporary name beside its final one and renamed into place
(`atomic.write_file`): a killed export leaves no half file under the final name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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
    "FAMILIES",
    "Family",
    "Target",
    "Planned",
    "gguf_target",
    "add_model_metadata",
    "to_gguf_layout",
    "model_plan",
    "extra_tensors",
    "lora_plan",
    "new_writer",
    "checked_file_type",
    "new_lora_writer",
    "write_gguf",
]

Q = gguf.GGMLQuantizationType
#: `--gguf_type` -> (the type of 2-D tensors, the file type llama.cpp reports).
FILE_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
#: The types a GGUF LoRA is written in: its rank-r factors are small, and r (their row length in lora_b) is
#: rarely a multiple of the 32-wide quantization blocks.
LORA_TYPES = ("f16", "bf16")
#: Checkpoint tensors that carry nothing llama.cpp needs (RoPE frequencies come from the metadata).
_SKIPPED = re.compile(r"\.rotary_emb\.inv_freq$")


# ------------------------------------------------------------------------------------------ families
@dataclass(frozen=True)
class Family:
    """How llama.cpp runs one Hugging Face architecture: its GGUF architecture, the RoPE scalings it reproduces,
    the weight conventions that differ from transformers', the keys it reads beyond the common ones, and the
    settings it cannot reproduce.

    Attributes:
        label: the family's name in messages ("Gemma 2").
        arch: llama.cpp's architecture (`general.architecture`, and the `TensorNameMap` of the tensor names).
        interleaved_rope: llama.cpp's graph rotates dimensions 2i and 2i + 1 (its LLaMA graph), where transformers
            rotates i and i + d/2: Q and K rows are reordered. False for the families llama.cpp runs with NEOX RoPE.
        norm_offset: added to every norm weight (Gemma's RMSNorm scales by 1 + w, llama.cpp's by w).
        rope_types: the RoPE scalings of transformers that llama.cpp reproduces for this family.
        add_keys: writes the family's own metadata keys (softcapping, sliding window...).
        refusal: a reason this configuration cannot be exported (llama.cpp would compute something else), or None.
    """

    label: str
    arch: gguf.MODEL_ARCH
    interleaved_rope: bool = False
    norm_offset: float = 0.0
    rope_types: tuple[str, ...] = ("default", "linear")
    add_keys: Callable[[gguf.GGUFWriter, Any], None] = lambda writer, config: None
    refusal: Callable[[Any], str | None] = lambda config: None


def _sliding_window_refusal(config) -> str | None:
    """Qwen 2's optional sliding window: llama.cpp's qwen2/qwen3 graphs attend over the whole context."""
    if getattr(config, "use_sliding_window", False):
        return "use_sliding_window is true, and llama.cpp's graph for it has no sliding window"
    return None


def _gemma_attention_scale(config) -> float:
    """The query scale llama.cpp's Gemma 2/3 graphs use: 1/sqrt(hidden / heads) for the 27B models (46 layers for
    Gemma 2, 62 for Gemma 3), else 1/sqrt(head_dim); it reads no key for it (llama-model.cpp, "f_attention_scale")."""
    layers_27b = {"gemma2": 46, "gemma3_text": 62}.get(config.model_type)
    if config.num_hidden_layers == layers_27b:
        return config.hidden_size // config.num_attention_heads
    return config.head_dim


def _gemma_refusal(config) -> str | None:
    """Settings of Gemma 2/3 that llama.cpp hard-codes: the query scale and (Gemma 2) the attention softcapping."""
    if float(config.query_pre_attn_scalar) != float(_gemma_attention_scale(config)):
        return (
            f"query_pre_attn_scalar is {config.query_pre_attn_scalar}, and llama.cpp scales queries by "
            f"1/sqrt({_gemma_attention_scale(config)}) for this shape"
        )
    if config.model_type == "gemma2" and getattr(config, "attn_logit_softcapping", None) is None:
        return "attn_logit_softcapping is null, and llama.cpp's Gemma 2 graph always caps attention logits"
    return None


def _gemma3_refusal(config) -> str | None:
    """Gemma 3 as llama.cpp runs it: `_gemma_refusal`'s settings, every sixth layer global (its fixed pattern) and
    local layers at RoPE base 10000 (also fixed)."""
    if reason := _gemma_refusal(config):
        return reason
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    if list(getattr(config, "layer_types", pattern)) != pattern:
        return "its layer_types are not every sixth layer global, the pattern llama.cpp's Gemma 3 graph uses"
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
    if float(local.get("rope_theta", 10000.0)) != 10000.0 or local.get("rope_type", "default") != "default":
        return f"its local layers' RoPE is {local}, and llama.cpp's Gemma 3 graph uses base 10000 unscaled there"
    return None


def _gemma2_keys(writer: gguf.GGUFWriter, config) -> None:
    """Gemma 2's softcapping and sliding window (the converter's `Gemma2Model.set_gguf_parameters`)."""
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)


def _gemma3_keys(writer: gguf.GGUFWriter, config) -> None:
    """Gemma 3's final softcapping (when set) and sliding window (the converter's `Gemma3Model`)."""
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)


def _phi3_keys(writer: gguf.GGUFWriter, config) -> None:
    """Phi-3's original context and sliding window, 0 for none (the converter's `Phi3MiniModel`)."""
    writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
    writer.add_sliding_window(config.sliding_window or 0)


_ARCH = gguf.MODEL_ARCH
#: The families the GGUF export writes, by Hugging Face architecture (config.json's `architectures`).
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("Llama", _ARCH.LLAMA, interleaved_rope=True, rope_types=("default", "linear", "llama3")),
    "MistralForCausalLM": Family("Mistral", _ARCH.LLAMA, interleaved_rope=True),
    "Qwen2ForCausalLM": Family("Qwen 2", _ARCH.QWEN2, refusal=_sliding_window_refusal),
    "Qwen3ForCausalLM": Family("Qwen 3", _ARCH.QWEN3, refusal=_sliding_window_refusal),
    "Gemma2ForCausalLM": Family(
        "Gemma 2", _ARCH.GEMMA2, norm_offset=1.0, add_keys=_gemma2_keys, refusal=_gemma_refusal
    ),
    "Gemma3ForCausalLM": Family(
        "Gemma 3", _ARCH.GEMMA3, norm_offset=1.0, add_keys=_gemma3_keys, refusal=_gemma3_refusal
    ),
    "Phi3ForCausalLM": Family("Phi-3", _ARCH.PHI3, rope_types=("default",), add_keys=_phi3_keys),
}
#: What to do instead, for architectures of these families that the export does not write.
_INSTEAD = {
    "Gemma3ForConditionalGeneration": "this is Gemma 3 with its vision tower; export its text model "
    "(Gemma3ForCausalLM), or export with --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py "
    "(--mmproj for the vision tower)",
}


@dataclass(frozen=True)
class Target:
    """A checkpoint as llama.cpp will run it: its family, its config.json (`config`), where that was read, and the
    shape values every family's metadata and tensor layout need."""

    family: Family
    config: Any
    where: Path

    @property
    def head_count(self) -> int:
        """Query heads."""
        return self.config.num_attention_heads

    @property
    def head_count_kv(self) -> int:
        """Key/value heads (as many as query heads without grouped-query attention)."""
        return getattr(self.config, "num_key_value_heads", None) or self.head_count

    @property
    def head_dim(self) -> int:
        """Width of a head (Qwen 3 and Gemma set it apart from hidden_size / heads)."""
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.head_count

    @property
    def rope(self) -> dict:
        """The RoPE parameters of the global-attention layers (transformers 5's `rope_parameters`, per layer type
        for Gemma 3, or 4's `rope_theta` + `rope_scaling`), with `rope_type` and `rope_theta` always present."""
        params = dict(getattr(self.config, "rope_parameters", None) or {})
        params = dict(params.get("full_attention", params))
        params.update(getattr(self.config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(self.config, "rope_theta", 10000.0))
        params["rope_type"] = params.get("rope_type", params.get("type", "default"))
        return params

    @property
    def rope_dims(self) -> int:
        """How many dimensions of each head are rotated (all but for a partial rotary factor, as Phi-4-mini has)."""
        factor = float(self.rope.get("partial_rotary_factor", getattr(self.config, "partial_rotary_factor", 1.0)))
        return int(factor * self.head_count * self.head_dim) // self.head_count

    @property
    def tied(self) -> bool:
        """Whether the head is the embedding (llama.cpp then has no `output.weight` and uses `token_embd`)."""
        return bool(getattr(self.config, "tie_word_embeddings", False))


def _refuse(where: Path, label: str, reason: str) -> ValueError:
    """The error for a `label` model whose config.json (`where`) llama.cpp would run differently, for `reason`."""
    return ValueError(
        f"{where}: this {label} model cannot be exported to GGUF: {reason}. Export it with --format hf "
        "instead (and convert that folder with llama.cpp's convert_hf_to_gguf.py where llama.cpp supports it)"
    )


def gguf_target(source_dir: Path) -> Target:
    """The `Target` of a checkpoint folder; a clear error, naming the family and the setting, for any architecture
    or option llama.cpp would run differently (which would give a file that loads but answers wrongly)."""
    config = AutoConfig.from_pretrained(source_dir)
    where = source_dir / "config.json"
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if architecture not in FAMILIES:
        instead = _INSTEAD.get(
            architecture, "export it with --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
        raise ValueError(
            f"{where}: architecture {architecture!r} cannot be exported to GGUF; supported: "
            f"{', '.join(f'{a} ({f.label})' for a, f in FAMILIES.items())}. {instead[0].upper()}{instead[1:]}"
        )
    target = Target(FAMILIES[architecture], config, where)
    rope_type = target.rope["rope_type"]
    if rope_type not in target.family.rope_types:
        reason = (
            f"RoPE scaling {rope_type!r} is not one the export writes for it ({', '.join(target.family.rope_types)})"
        )
        raise _refuse(where, target.family.label, reason)
    if refusal := target.family.refusal(config):
        raise _refuse(where, target.family.label, refusal)
    return target


def add_model_metadata(writer: gguf.GGUFWriter, target: Target) -> None:
    """The `<arch>.*` keys llama.cpp reads to build the graph: the shape, RoPE, norm epsilon, and the family's own."""
    config = target.config
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(target.head_count)
    writer.add_head_count_kv(target.head_count_kv)
    writer.add_rope_dimension_count(target.rope_dims)
    if target.head_dim != config.hidden_size // target.head_count or target.family.norm_offset:
        writer.add_key_length(target.head_dim)  # Gemma's are always written, as its converter does
        writer.add_value_length(target.head_dim)
    rope = target.rope
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    target.family.add_keys(writer, config)


def _interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows (output features) of a Q or K projection from Hugging Face's RoPE pairing to llama.cpp's
    LLaMA graph's.

    Within each head, HF rotates dimension i with i + d/2 ("rotate half"); llama.cpp's LLaMA graph rotates 2i
    with 2i + 1. Row i of a head moves to 2i and row i + d/2 to 2i + 1, so both compute the same attention.
    Works on a weight (out x in), a bias (out) and a LoRA's B (out x r) alike.
    """
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def to_gguf_layout(name: str, tensor: torch.Tensor, target: Target) -> torch.Tensor:
    """`tensor` (named as in the GGUF, `.lora_a`/`.lora_b` included) as llama.cpp expects it in `target`'s
    family: Q/K rows reordered for the LLaMA graph, norms offset for Gemma."""
    family = target.family
    if family.interleaved_rope and not name.endswith(".lora_a"):
        if ".attn_q." in name:
            return _interleave_rope_rows(tensor, target.head_count)
        if ".attn_k." in name:
            return _interleave_rope_rows(tensor, target.head_count_kv)
    if family.norm_offset and name.endswith("norm.weight"):
        return tensor.float() + family.norm_offset
    return tensor


def _llama3_rope_factors(target: Target) -> torch.Tensor:
    """Llama 3's RoPE scaling as llama.cpp applies it: one divisor per frequency (`rope_freqs`), the default
    frequencies over the scaled ones, both as transformers computes them for this config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](target.config, "cpu")
    dims = torch.arange(0, target.rope_dims, 2, dtype=torch.float32)
    default = 1.0 / (float(target.rope["rope_theta"]) ** (dims / target.rope_dims))
    return (default / scaled.float()).float()


def extra_tensors(target: Target) -> list[tuple[Planned, torch.Tensor]]:
    """Tensors llama.cpp needs that the checkpoint does not hold (Llama 3's `rope_freqs`), first in the file as the
    converter writes them."""
    if target.rope["rope_type"] != "llama3":
        return []
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    factors = _llama3_rope_factors(target)
    return [(Planned("(rope_scaling llama3)", name, tuple(factors.shape), Q.F32), factors)]


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


def _gguf_name(names: gguf.TensorNameMap, key: str, target: Target) -> str:
    """The GGUF name of a checkpoint key (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`)."""
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise KeyError(
            f"{target.where.parent}: tensor {key!r} has no place in llama.cpp's {target.family.label} layout"
        )
    return name


def _tensor_order(name: str) -> tuple[int, str]:
    """Embedding first, then the blocks in order, then the final norm and head, as llama.cpp's converter writes."""
    block = re.match(r"blk\.(\d+)\.", name)
    return (int(block[1]) if block else (-1 if name.startswith("token_embd") else 1 << 30)), name


def _tensor_names(target: Target) -> gguf.TensorNameMap:
    """Checkpoint key -> GGUF name, for `target`'s architecture."""
    return gguf.TensorNameMap(target.family.arch, target.config.num_hidden_layers)


def model_plan(shapes: dict[str, tuple], target: Target, gguf_type: str) -> list[Planned]:
    """Every checkpoint tensor of the merged model, in file order, with its GGUF name and storage type (a tied head
    is left out: llama.cpp uses the embedding)."""
    names = _tensor_names(target)
    keys = [k for k in shapes if not _SKIPPED.search(k) and not (target.tied and k == "lm_head.weight")]
    named = {key: _gguf_name(names, key, target) for key in keys}
    output = "output.weight" if "output.weight" in named.values() else "token_embd.weight"
    plan = [
        Planned(key, name, shapes[key], _storage_type(name, shapes[key], gguf_type, output))
        for key, name in named.items()
    ]
    return sorted(plan, key=lambda p: _tensor_order(p.name))


# --------------------------------------------------------------------------------------------- writers
def new_writer(name: str, file_type: gguf.LlamaFileType, kind: str, target: Target) -> gguf.GGUFWriter:
    """A writer with the keys every file shares: `target`'s architecture, type ("model" or "adapter"), name
    (`model_name`), file type."""
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[target.family.arch])
    writer.add_type(kind)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return writer


def new_lora_writer(name: str, file_type: gguf.LlamaFileType, alpha: float, target: Target) -> gguf.GGUFWriter:
    """A writer for a LoRA adapter: `new_writer`'s keys, then `adapter.type` = "lora" and `adapter.lora.alpha`."""
    writer = new_writer(name, file_type, "adapter", target)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    return writer


def checked_file_type(gguf_type: str, what: str = "a GGUF model", allowed: tuple[str, ...] = tuple(FILE_TYPES)):
    """The `gguf.LlamaFileType` of `gguf_type`, or an error naming the types `what` can be written in."""
    if gguf_type not in allowed:
        raise ValueError(f"gguf_type {gguf_type!r} is not one {what} is written in; choose one of {', '.join(allowed)}")
    return FILE_TYPES[gguf_type][1]


def lora_plan(
    adapter: Adapter, shapes: dict[str, tuple], target: Target, gguf_type: str
) -> list[tuple[Planned, torch.Tensor]]:
    """(planned tensor, its data) of every LoRA factor: `<name>.lora_a` = A (r x in), `<name>.lora_b` = B
    (out x r, rows in llama.cpp's order), as llama.cpp checks them against the base tensor `<name>`."""
    factors = lora_factors(adapter)
    check_adapted_modules(target.where.parent, factors, shapes)
    names = _tensor_names(target)
    qtype = FILE_TYPES[gguf_type][0]
    tensors = []
    for module, (lora_A, lora_B, _) in factors.items():
        name = _gguf_name(names, f"{module}.weight", target)
        for suffix, factor in ((".lora_a", lora_A), (".lora_b", lora_B)):
            planned = Planned(f"{module}.{suffix[1:]}", name + suffix, tuple(factor.shape), qtype)
            tensors.append((planned, to_gguf_layout(planned.name, factor, target)))
    return sorted(tensors, key=lambda t: _tensor_order(t[0].name))
