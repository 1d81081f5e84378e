"""GGUF export: the tuned model, or its adapter alone, as files that llama.cpp, Ollama and LM Studio run.

`save_gguf` writes the merged model (the same bf16 tensors as the Hugging Face export: `merge.merged_tensors`)
as one GGUF file with the architecture's metadata, the tokenizer, its special tokens and the chat template the
adapter was trained with. `save_gguf_lora` writes the adapter alone as a GGUF LoRA (llama.cpp's `--lora`, Ollama's
ADAPTER where Ollama still accepts it: `ollama.OLLAMA_ADAPTER_NOTE`). Each also writes an Ollama `Modelfile` beside
the file; `general.name` is the model's published name (`model_name`). This module checks the outputs and puts the
pieces together: `gguf_model` (each family's metadata and tensors, streamed), `gguf_vocab` (the tokenizer and chat
template as metadata) and `ollama` (the Modelfile).
"""

from __future__ import annotations

import os
from itertools import chain
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from . import builtin, hub
from .adapters import Adapter
from .atomic import write_text
from .checkpoint_files import CheckpointTensors
from .gguf_model import (
    LORA_TYPES,
    Target,
    add_model_metadata,
    checked_file_type,
    extra_tensors,
    gguf_target,
    lora_plan,
    model_plan,
    new_lora_writer,
    new_writer,
    to_gguf_layout,
    write_gguf,
)
from .gguf_vocab import add_tokenizer, chat_template, vocabulary
from .merge import (
    GGUFTemplate,
    GGUFType,
    check_adapted_modules,
    lora_factors,
    merged_tensors,
    quantized_linears,
)
from .ollama import MODELFILE, modelfile_path, ollama_modelfile, stop_strings
from .specs import QuantSpec
from .tokenizer import read_tokenizer

__all__ = ["save_gguf", "save_gguf_lora", "model_name"]


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


def _write_model(
    name: str,
    source_dir: Path,
    target: Target,
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
    writer = new_writer(name, checked_file_type(gguf_type), "model", target)
    add_model_metadata(writer, target)
    add_tokenizer(writer, vocabulary(source_dir, target.config.vocab_size), tokenizer, chat)
    factors = lora_factors(adapter) if adapter is not None else {}
    checkpoint = CheckpointTensors(source_dir)
    check_adapted_modules(source_dir, factors, checkpoint.shapes)
    extra, plan = extra_tensors(target), model_plan(checkpoint.shapes, target, gguf_type)
    merged = merged_tensors(
        source_dir, factors, [p.key for p in plan], checkpoint, quantized=quantized, quant=quant, device=device
    )
    tensors = (to_gguf_layout(p.name, tensor, target) for p, (_, tensor) in zip(plan, merged, strict=True))
    return write_gguf(output, writer, [p for p, _ in extra] + plan, chain((t for _, t in extra), tensors))


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
    checked_file_type(gguf_type)
    _check_outputs([output, modelfile], overwrite)
    target = gguf_target(source_dir)
    tokenizer = read_tokenizer(str(source_dir))
    chat = chat_template(template, tokenizer)
    quantized = quantized_linears(source_dir, quant) if from_quantized else None
    _write_model(
        model_name(base, source_dir),
        source_dir,
        target,
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
        model=modelfile_path(output, output.parent), template=template, stops=stop_strings(template, tokenizer, chat)
    )
    write_text(modelfile, text)
    return output


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
    file_type = checked_file_type(gguf_type, "a GGUF LoRA", LORA_TYPES)
    base_path = output.with_name(f"{output.stem}.base.gguf")  # written when no `base_gguf` is given
    modelfile = output.parent / MODELFILE
    _check_outputs([output, modelfile] + ([base_path] if base_gguf is None else []), overwrite)
    target = gguf_target(source_dir)
    tokenizer = read_tokenizer(str(source_dir))
    chat = chat_template(template, tokenizer)
    tensors = lora_plan(adapter, CheckpointTensors(source_dir).shapes, target, gguf_type)
    if base_gguf is None:
        _write_model(
            model_name(base, source_dir),
            source_dir,
            target,
            None,
            base_path,
            gguf_type=gguf_type,
            chat=chat,
            tokenizer=tokenizer,
            quantized=None,
            quant=QuantSpec(),
            device=torch.device("cpu"),
        )
    writer = new_lora_writer(model_name(base, source_dir), file_type, float(adapter.config["lora_alpha"]), target)
    write_gguf(output, writer, [p for p, _ in tensors], (t for _, t in tensors))
    model = modelfile_path(base_path, output.parent) if base_gguf is None else base_gguf
    text = ollama_modelfile(
        model=model,
        template=template,
        stops=stop_strings(template, tokenizer, chat),
        adapter=modelfile_path(output, output.parent),
    )
    write_text(modelfile, text)
    return output
