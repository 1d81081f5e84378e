"""GGUF export: the tuned model, or its adapter alone, as files that llama.cpp, Ollama and LM Studio run.

`save_gguf` writes the merged model (the same bf16 tensors as the Hugging Face export: `merge.merged_tensors`)
as one GGUF file with the architecture's metadata, the tokenizer, its special tokens and the chat template the
adapter was trained with. `save_gguf_lora` writes the adapter alone as a GGUF LoRA (llama.cpp's `--lora`, Ollama's
ADAPTER where Ollama still accepts it: `OLLAMA_ADAPTER_NOTE`). Each also writes an Ollama `Modelfile` beside the file;
`general.name` is the model's published name (`model_name`). The `gguf` package (maintained with llama.cpp)
does the file format, the tensor names (`TensorNameMap`) and the quantization (`gguf.quants`); what llama.cpp
expects beyond the format lives here:
- Q and K rows are reordered per head: Hugging Face pairs RoPE dimensions i and i + d/2 within a head,
  llama.cpp's LLaMA graph pairs 2i and 2i + 1 (`_llama_rope_rows`). A LoRA's B follows its weight's rows.
- a LoRA's `lora_a` is PEFT's A (r × in) and `lora_b` its B (out × r), unscaled; llama.cpp adds
  `lora_b @ lora_a * adapter.lora.alpha / r`, r read from the tensors.
- 1-D tensors (norms) are f32, as llama.cpp's converter writes them.

Writing streams: every tensor's name, shape and type goes into the header first, then the tensors are merged,
converted and written one at a time, so memory holds one tensor (plus its float32 copy while quantizing), never
the model. The file is written under a temporary name beside its final one and renamed into place
(`atomic.write_file`): a killed export leaves no half file under the final name. Llama-architecture models
(LLaMA, LLaMA-2, SmolLM2) are supported; any other architecture is an error that says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from . import builtin, hub
from .adapters import Adapter
from .atomic import write_file, write_text
from .data.templates import QLORA_SYSTEM
from .data.tokenize import special_prefix
from .merge import (
    GGUFTemplate,
    GGUFType,
    check_adapted_modules,
    lora_factors,
    merged_tensors,
    open_checkpoint,
    quantized_linears,
)
from .specs import QuantSpec

__all__ = [
    "save_gguf",
    "save_gguf_lora",
    "llama_shape",
    "vocabulary",
    "chat_template",
    "model_name",
    "ollama_modelfile",
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
MODELFILE = "Modelfile"
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


def _add_llama_metadata(writer: gguf.GGUFWriter, shape: LlamaShape) -> None:
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


def _to_llama_layout(name: str, tensor: torch.Tensor, shape: LlamaShape) -> torch.Tensor:
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


def _write(path: Path, writer: gguf.GGUFWriter, plan: list[Planned], tensors: Iterator[torch.Tensor]) -> Path:
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


def _model_plan(source_dir: Path, shapes: dict[str, tuple], shape: LlamaShape, gguf_type: str) -> list[Planned]:
    """Every tensor of the merged model, in file order, with its GGUF name and storage type."""
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, shape.block_count)
    named = {key: _gguf_name(names, key, source_dir) for key in shapes if not _SKIPPED.search(key)}
    output = "output.weight" if "output.weight" in named.values() else "token_embd.weight"
    plan = [
        Planned(key, name, shapes[key], _storage_type(name, shapes[key], gguf_type, output))
        for key, name in named.items()
    ]
    return sorted(plan, key=lambda p: _tensor_order(p.name))


# -------------------------------------------------------------------------------------------- tokenizer
class Vocabulary(NamedTuple):
    """The tokenizer as GGUF metadata: llama.cpp's tokenizer kind ("gpt2": byte-level BPE; "llama":
    SentencePiece-style BPE with byte fallback), its pre-tokenizer name, the tokens by id with their types and
    scores, and the merges (which transformers reads back; llama.cpp's "llama" kind ranks by score instead)."""

    model: str
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    add_space_prefix: bool | None


def _parts(spec: dict | None) -> list[dict]:
    """A tokenizer.json normalizer or pre-tokenizer as the list of its steps (a Sequence flattened)."""
    if spec is None:
        return []
    if spec["type"] == "Sequence":
        return [step for part in spec.get("normalizers") or spec["pretokenizers"] for step in _parts(part)]
    return [spec]


def _pre_tokenizer_steps(spec: dict | None) -> tuple:
    """A byte-level tokenizer's pre-tokenizer as a tuple of steps that can be compared with known ones."""
    steps = []
    for part in _parts(spec):
        if part["type"] == "ByteLevel":
            steps += ["gpt2-regex"] if part.get("use_regex", True) else []
        elif part["type"] == "Digits":
            steps.append(("digits", bool(part.get("individual_digits"))))
        else:
            steps.append(json.dumps(part, sort_keys=True))
    return tuple(steps)


#: llama.cpp's name for each byte-level pre-tokenizer the export recognises (its `tokenizer.ggml.pre`); llama.cpp
#: splits the text with the same expressions before merging, so a file and the folder's tokenizer agree.
_BYTE_LEVEL_PRE = {
    ("gpt2-regex",): "gpt-2",  # GPT-2's expression alone (SmolLM2 as transformers rebuilds it from GGUF)
    (("digits", True), "gpt2-regex"): "smollm",  # each digit apart first (SmolLM2 and StarCoder as published)
}


def _byte_level_pre(tokenizer_json: dict, where: Path) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer.json, or an error when llama.cpp has none that
    splits text as it does (the file would load and tokenize differently)."""
    steps = _pre_tokenizer_steps(tokenizer_json.get("pre_tokenizer"))
    if tokenizer_json.get("normalizer") is not None or steps not in _BYTE_LEVEL_PRE:
        raise ValueError(
            f"{where}: this byte-level tokenizer's normalizer/pre-tokenizer ({steps}) is not one the GGUF export "
            f"recognises (GPT-2's, or SmolLM2's digits + GPT-2); llama.cpp would split text differently"
        )
    return _BYTE_LEVEL_PRE[steps]


def _adds_space_prefix(tokenizer_json: dict) -> bool:
    """Whether a SentencePiece-style tokenizer writes "▁" before the text (LLaMA-2 does, by a Prepend normalizer in
    older files and a Metaspace pre-tokenizer in newer ones)."""
    steps = _parts(tokenizer_json.get("normalizer")) + _parts(tokenizer_json.get("pre_tokenizer"))
    return any(
        (step["type"] == "Prepend" and step.get("prepend") == "\u2581")
        or (
            step["type"] == "Metaspace"
            and (step.get("prepend_scheme") in ("first", "always") or step.get("add_prefix_space"))
        )
        for step in steps
    )


def _merges(model: dict, where: Path) -> list[str]:
    """tokenizer.json's merges as GGUF writes them: "left right"."""
    merges = []
    for merge in model.get("merges", []):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if len(pair) != 2 or any(" " in part for part in pair):
            raise ValueError(f"{where}: merge {merge!r} cannot be written as GGUF's 'left right'")
        merges.append(" ".join(pair))
    return merges


def vocabulary(source_dir: Path, n_vocab: int) -> Vocabulary:
    """The tokenizer of a checkpoint folder (its `tokenizer.json`) as GGUF metadata for a model of `n_vocab`
    embedding rows.

    Added tokens marked special become CONTROL tokens (never split, never produced from text unless asked),
    other added tokens USER_DEFINED; ids the tokenizer lacks below `n_vocab` become UNUSED `[PAD<id>]` tokens, as
    llama.cpp needs one token per embedding row. A "llama" token's score is minus the rank of the merge that
    makes it, so llama.cpp's score-ordered merging applies the merges in tokenizer.json's order.
    """
    where = source_dir / "tokenizer.json"
    if not where.is_file():
        raise FileNotFoundError(
            f"{source_dir}: no tokenizer.json; the GGUF export carries the fast tokenizer's vocabulary "
            "(load the tokenizer with transformers and save_pretrained it into the folder)"
        )
    tokenizer_json = json.loads(where.read_text(encoding="utf-8"))
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: tokenizer model {model.get('type')!r} is not supported (BPE tokenizers only)")
    byte_fallback = bool(model.get("byte_fallback"))
    by_id = {index: token for token, index in model["vocab"].items()}
    types = {index: gguf.TokenType.NORMAL for index in by_id}
    for added in tokenizer_json.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(by_id) >= n_vocab:
        raise ValueError(f"{where}: token id {max(by_id)} is beyond the model's {n_vocab} embedding rows")
    for index in range(n_vocab):
        if index not in by_id:
            by_id[index], types[index] = f"[PAD{index}]", gguf.TokenType.UNUSED
    tokens = [by_id[index] for index in range(n_vocab)]
    merges = _merges(model, where)
    if not byte_fallback:
        return Vocabulary(
            "gpt2",
            _byte_level_pre(tokenizer_json, where),
            tokens,
            [int(types[i]) for i in range(n_vocab)],
            None,
            merges,
            None,
        )
    for index, token in enumerate(tokens):
        if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types[index] = gguf.TokenType.BYTE
        elif token == model.get("unk_token"):
            types[index] = gguf.TokenType.UNKNOWN
    rank = {}
    for position, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), position)
    scores = [-float(rank.get(token, 0)) for token in tokens]
    return Vocabulary(
        "llama",
        None,
        tokens,
        [int(types[i]) for i in range(n_vocab)],
        scores,
        merges,
        _adds_space_prefix(tokenizer_json),
    )


def _add_tokenizer(writer: gguf.GGUFWriter, vocab: Vocabulary, tokenizer: PreTrainedTokenizerBase) -> None:
    """The `tokenizer.ggml.*` keys: vocabulary, special token ids, and whether BOS/EOS are added to a text, as
    the folder's tokenizer adds them (training's `special_prefix`: [BOS] for LLaMA-2, nothing for SmolLM2)."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    eos = [tokenizer.eos_token_id]
    writer.add_add_bos_token(special_prefix(tokenizer) == [tokenizer.bos_token_id])
    writer.add_add_eos_token(full[-1:] == eos and plain[-1:] != eos)


def _load_tokenizer(source_dir: Path) -> PreTrainedTokenizerBase:
    """The folder's own tokenizer, unchanged (no pad token chosen for training: the file says what the base says)."""
    try:
        return AutoTokenizer.from_pretrained(source_dir)
    except (OSError, ValueError) as e:
        raise type(e)(f"cannot load the tokenizer of {source_dir}: {e}") from e


# ------------------------------------------------------------------------------------------ chat formats
def _qlora_jinja(eos_token: str) -> str:
    """The "qlora" prompt as a Jinja chat template: the text before an answer is exactly training's source.

    A system message replaces the default sentence; each user turn is "### Human: … ### Assistant:", and an earlier
    assistant turn " … " (how training writes past turns). The last message, when it is the assistant's, is the
    answer being written: it follows "### Assistant:" directly and ends with `eos_token`. Chat clients find where
    an answer goes and where it stops by rendering a placeholder answer there: node-llama-cpp's chat API prompts
    with the text before it (training's source, which ends at the colon: the answer's first token carries its
    space, " Paris") and stops at the text after it. That is EOS, as training's target is the response and EOS;
    with " " there, every answer stopped at its first space. Every piece is an expression with whitespace control,
    so the result does not depend on the engine's trim_blocks / lstrip_blocks settings. EOS is written as its text,
    not the `eos_token` variable, as not every client passes that variable. No BOS: the tokenizer adds it
    (`tokenizer.ggml.add_bos_token`), as training's `encode_prompt` does.
    """
    return (
        "{%- if messages and messages[0]['role'] == 'system' and messages[0]['content'] -%}"
        "{{ messages[0]['content'] }}"
        "{%- else -%}"
        f"{{{{ {json.dumps(QLORA_SYSTEM)} }}}}"
        "{%- endif -%}"
        "{{ '\\n' }}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ '### Human: ' + message['content'] + ' ### Assistant:' }}"
        "{%- elif message['role'] == 'assistant' and loop.last -%}"
        f"{{{{ message['content'] + {json.dumps(eos_token)} }}}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ ' ' + message['content'] + ' ' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


#: What a GGUF LoRA's Modelfile says above its ADAPTER line. Ollama's Modelfile reference still documents ADAPTER,
#: but Ollama 0.34.1 (ollama/ollama#14969, 2026-09) is reported to refuse Modelfiles with ADAPTER in `ollama create`
#: (generative-computing/mellea#1651); models built before keep working.
OLLAMA_ADAPTER_NOTE = (
    "ADAPTER: Ollama from 0.34.1 is reported to refuse it in `ollama create`. There, export the merged model\n"
    "instead (qlora-lightning export --format gguf); llama.cpp applies this adapter itself:\n"
    "llama-cli -m <base .gguf> --lora <adapter .gguf>"
)
#: The same prompt as an Ollama (Go) template; Ollama gives the Modelfile's SYSTEM unless a message replaces it.
_QLORA_OLLAMA = (
    "{{ .System }}\n"
    '{{ range .Messages }}{{ if eq .Role "user" }}### Human: {{ .Content }} ### Assistant:'
    '{{ else if eq .Role "assistant" }} {{ .Content }} {{ end }}{{ end }}'
)


def chat_template(template: GGUFTemplate, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Jinja chat template written into the GGUF for the prompt format the adapter was trained with."""
    if template == "qlora":
        if not tokenizer.eos_token:
            raise ValueError(f"template 'qlora' ends each answer with EOS; {tokenizer.name_or_path} has no EOS token")
        return _qlora_jinja(tokenizer.eos_token)
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"template 'chat' needs a tokenizer with a chat template; {tokenizer.name_or_path} has none"
            )
        return tokenizer.chat_template
    raise ValueError(f"unknown template {template!r}; the GGUF export writes 'qlora' or 'chat'")


def ollama_modelfile(*, model: str, template: GGUFTemplate, stops: list[str], adapter: str | None = None) -> str:
    """An Ollama Modelfile: `model` (a path relative to the Modelfile, or an Ollama model name), the adapter for
    a GGUF LoRA (with `OLLAMA_ADAPTER_NOTE` above it), the prompt format and its stop strings, so that `ollama create
    NAME -f Modelfile` needs no edit.

    For "chat" no TEMPLATE is written: Ollama takes the chat template stored in the GGUF (a Jinja template it
    cannot run as such, but recognises for the common formats); "qlora" has no such fallback, so it is spelled
    out with its default SYSTEM sentence.
    """
    lines = ["# Written by qlora-lightning export. Run: ollama create <name> -f Modelfile", f"FROM {model}"]
    if adapter is not None:
        lines += [f"# {line}" for line in OLLAMA_ADAPTER_NOTE.splitlines()] + [f"ADAPTER {adapter}"]
    if template == "qlora":
        lines += [f'TEMPLATE """{_QLORA_OLLAMA}"""', f'SYSTEM """{QLORA_SYSTEM}"""']
    else:
        lines.append("# TEMPLATE: Ollama reads the chat template stored in the GGUF file")
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def _stops(template: GGUFTemplate, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Where an answer ends: the EOS token training appends, and for "qlora" the next "### Human:" turn."""
    eos = [tokenizer.eos_token] if tokenizer.eos_token else []
    return eos + (["### Human:"] if template == "qlora" else [])


def _relative(path: Path, folder: Path) -> str:
    """`path` as a Modelfile writes it: relative to the Modelfile's folder (Ollama resolves it from there)."""
    return "./" + os.path.relpath(path, folder)


# -------------------------------------------------------------------------------------------------- files
def _check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Fail before any work when an output cannot be written: its folder missing (an export never invents
    folders for a mistyped path) or, without `overwrite`, the file already there."""
    for path in paths:
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
        if path.is_dir():
            raise IsADirectoryError(f"cannot write {path}: it is a folder; name the .gguf file to write")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; choose another output or pass overwrite")


def model_name(base: str, source_dir: Path) -> str:
    """`general.name`, the name llama.cpp, Ollama and LM Studio show: the model's published name, not the way the
    command line reached it. A built-in model's is its GGUF file's (SmolLM2-135M-Instruct), a hub id's its
    repository's (`meta-llama/Llama-2-7b-hf` → Llama-2-7b-hf, also when reached as a hub-cache snapshot folder),
    a local folder's its folder name."""
    if base.startswith(builtin.PREFIX):
        try:
            return builtin.smollm2_gguf().name.split(".", 1)[0]
        except (ModuleNotFoundError, FileNotFoundError):  # converted earlier, its wheel gone since
            return base[len(builtin.PREFIX) :]
    repository = source_dir.parent.parent.name
    if source_dir.parent.name == "snapshots" and repository.startswith("models--"):
        return repository.split("--")[-1]
    return source_dir.name


def _new_writer(name: str, file_type: gguf.LlamaFileType, kind: str) -> gguf.GGUFWriter:
    """A writer with the keys every file shares: architecture, type ("model" or "adapter"), name (`model_name`),
    file type."""
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(kind)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return writer


def _file_type(gguf_type: str, what: str = "a GGUF model", allowed: tuple[str, ...] = tuple(FILE_TYPES)):
    """The `gguf.LlamaFileType` of `gguf_type`, or an error naming the types `what` can be written in."""
    if gguf_type not in allowed:
        raise ValueError(f"gguf_type {gguf_type!r} is not one {what} is written in; choose one of {', '.join(allowed)}")
    return FILE_TYPES[gguf_type][1]


def _write_model(
    name: str,
    source_dir: Path,
    adapter: Adapter | None,
    output: Path,
    *,
    gguf_type: str,
    chat: str,
    tokenizer: PreTrainedTokenizerBase,
    quantized: set[str] | None,
    quant: QuantSpec,
    device: torch.device,
) -> Path:
    """The model (`adapter` merged in, or the base alone) as one GGUF file with `chat` as its chat template,
    streamed tensor by tensor."""
    shape = llama_shape(source_dir)
    writer = _new_writer(name, _file_type(gguf_type), "model")
    _add_llama_metadata(writer, shape)
    _add_tokenizer(writer, vocabulary(source_dir, shape.vocab_size), tokenizer)
    writer.add_chat_template(chat)
    factors = lora_factors(adapter) if adapter is not None else {}
    with contextlib.ExitStack() as stack:
        handles, shapes = open_checkpoint(stack, source_dir)
        check_adapted_modules(source_dir, factors, shapes)
        plan = _model_plan(source_dir, shapes, shape, gguf_type)
        merged = merged_tensors(
            source_dir, factors, [p.key for p in plan], handles, quantized=quantized, quant=quant, device=device
        )
        tensors = (_to_llama_layout(p.name, tensor, shape) for p, (_, tensor) in zip(plan, merged))
        return _write(output, writer, plan, tensors)


def save_gguf(
    base: str,
    adapter: Adapter,
    output: str | os.PathLike,
    *,
    gguf_type: GGUFType = "f16",
    template: GGUFTemplate = "qlora",
    from_quantized: bool = False,
    quant: QuantSpec = QuantSpec(),
    device: torch.device | str = "cpu",
    overwrite: bool = False,
) -> Path:
    """Write `base` with `adapter` merged in as one GGUF file, and an Ollama `Modelfile` beside it.

    The weights are `merge.merged_tensors`' (the original base weights by default, exactly what the Hugging Face
    export holds); f16 (the default) stores those bf16 values exactly, bf16 too, q8_0 and q4_0 round them.
    Everything that can be checked (architecture, tokenizer, adapter against base, outputs) is checked before
    the file is started.

    Args:
        base: hub id, folder or `builtin:` name of the base checkpoint; its safetensors are re-read.
        adapter: the adapter to merge (`adapters.read_adapter`).
        output: the `.gguf` file to write; its folder must exist.
        gguf_type: "f16", "bf16", "q8_0" or "q4_0" (see `export.export_model`).
        template: the prompt format for the chat template and the Modelfile: "qlora" or "chat".
        from_quantized, quant, device: merge into dequantize(NF4(W)) instead (see `merge.save_merged`).
        overwrite: replace an existing file (and Modelfile).
    """
    source_dir, output = hub.checkpoint_dir(base), Path(output)
    modelfile = output.parent / MODELFILE
    _file_type(gguf_type)
    _check_outputs([output, modelfile], overwrite)
    tokenizer = _load_tokenizer(source_dir)
    chat = chat_template(template, tokenizer)
    quantized = quantized_linears(source_dir, quant) if from_quantized else None
    _write_model(
        model_name(base, source_dir),
        source_dir,
        adapter,
        output,
        gguf_type=gguf_type,
        chat=chat,
        tokenizer=tokenizer,
        quantized=quantized,
        quant=quant,
        device=torch.device(device),
    )
    text = ollama_modelfile(
        model=_relative(output, output.parent), template=template, stops=_stops(template, tokenizer)
    )
    write_text(modelfile, text)
    return output


def _lora_plan(
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
            tensors.append((planned, _to_llama_layout(planned.name, factor, shape)))
    return sorted(tensors, key=lambda t: _tensor_order(t[0].name))


def save_gguf_lora(
    base: str,
    adapter: Adapter,
    output: str | os.PathLike,
    *,
    gguf_type: GGUFType = "f16",
    template: GGUFTemplate = "qlora",
    base_gguf: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `adapter` alone as a GGUF LoRA adapter in llama.cpp's layout, and an Ollama `Modelfile` beside it.

    The file holds `adapter.type` = "lora", `adapter.lora.alpha` and, for each adapted matrix `blk.N.<name>.weight`
    of the base, `….lora_a` and `….lora_b`; llama.cpp applies it to a GGUF of the base (`llama-cli -m base.gguf
    --lora adapter.gguf`, Ollama's ADAPTER, which newer Ollama releases are reported to refuse: `OLLAMA_ADAPTER_NOTE`).
    The base's shapes are checked against the adapter first.

    Args:
        base: hub id, folder or `builtin:` name of the base the adapter was trained on (its config and tensor
            shapes are read; its weights only when the base GGUF is written).
        adapter: the adapter (`adapters.read_adapter`).
        output: the `.gguf` file to write; its folder must exist.
        gguf_type: "f16" (default: what every llama.cpp build applies; it keeps the adapter's bf16 values but
            for |x| < 6e-5) or "bf16" (exact).
        template: the prompt format for the Modelfile (and the base GGUF, when written): "qlora" or "chat".
        base_gguf: the base as GGUF for the Modelfile's FROM (a path relative to the output's folder, or an
            Ollama model name). None: the unmerged base is written beside as `<output stem>.base.gguf` in
            `gguf_type`, converted exactly as `save_gguf` converts, so its tensors match the adapter's.
        overwrite: replace existing files.
    """
    source_dir, output = hub.checkpoint_dir(base), Path(output)
    file_type = _file_type(gguf_type, "a GGUF LoRA", LORA_TYPES)
    base_path = output.with_name(f"{output.stem}.base.gguf") if base_gguf is None else None
    modelfile = output.parent / MODELFILE
    _check_outputs([output, modelfile] + ([base_path] if base_path else []), overwrite)
    tokenizer = _load_tokenizer(source_dir)
    chat = chat_template(template, tokenizer)
    shape = llama_shape(source_dir)
    with contextlib.ExitStack() as stack:
        _, shapes = open_checkpoint(stack, source_dir)
        tensors = _lora_plan(source_dir, adapter, shapes, shape, gguf_type)
    if base_path is not None:
        _write_model(
            model_name(base, source_dir),
            source_dir,
            None,
            base_path,
            gguf_type=gguf_type,
            chat=chat,
            tokenizer=tokenizer,
            quantized=None,
            quant=QuantSpec(),
            device=torch.device("cpu"),
        )
    writer = _new_writer(model_name(base, source_dir), file_type, "adapter")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.config["lora_alpha"]))
    _write(output, writer, [p for p, _ in tensors], (t for _, t in tensors))
    model = _relative(base_path, output.parent) if base_path is not None else base_gguf
    text = ollama_modelfile(
        model=model, template=template, stops=_stops(template, tokenizer), adapter=_relative(output, output.parent)
    )
    write_text(modelfile, text)
    return output
