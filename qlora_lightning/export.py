"""The `export` command: the tuned model as a merged Hugging Face folder (`merge.py`), or as GGUF for llama.cpp,
Ollama and LM Studio (`export_gguf.py`, imported only for those formats, as it needs the `gguf` package)."""

from __future__ import annotations

from typing import Literal, get_args

from .merge import GGUFTemplate, GGUFType, checked_adapter, export_merged
from .model import resolve_device
from .specs import QuantSpec

__all__ = ["ExportFormat", "export_model"]

#: What `export` writes: a merged Hugging Face folder, a merged GGUF file, or the adapter alone as a GGUF LoRA.
ExportFormat = Literal["hf", "gguf", "gguf-lora"]


def export_model(
    *,
    base: str,
    adapter: str,
    output: str,
    format: ExportFormat = "hf",
    gguf_type: GGUFType = "f16",
    template: GGUFTemplate = "qlora",
    base_gguf: str | None = None,
    from_quantized: bool = False,
    quant: QuantSpec = QuantSpec(),
    device: str = "auto",
    max_shard_size: str = "5GB",
    allow_other_base: bool = False,
    overwrite: bool = False,
) -> str:
    """`qlora-lightning export`: the tuned model as a merged Hugging Face folder or as GGUF for llama.cpp, Ollama
    and LM Studio.

    Args:
        base: hub id, local folder or `builtin:` name of the base the adapter was trained on.
        adapter: the PEFT LoRA adapter folder.
        output: the folder (`hf`) or `.gguf` file to write; a GGUF's folder must exist, and an Ollama `Modelfile`
            is written into it beside the file. A `.gguf` name with format "hf" is an error (a folder would be
            written under that name), and an hf export never replaces a file.
        format: "hf" (default: the merged bf16 folder that transformers loads), "gguf" (the merged model as one
            GGUF file with its tokenizer and chat template) or "gguf-lora" (the adapter alone, for llama.cpp's
            `--lora`, and Ollama's ADAPTER where Ollama still accepts it: releases from 0.34.1 are reported to refuse
            it, so "gguf" is the format for Ollama).
        gguf_type: how GGUF matrices are stored: "f16" (default: the merged bf16 weights exactly, which every
            llama.cpp build runs), "bf16", "q8_0" (half the size, close to f16) or "q4_0" (a quarter; its output
            matrix stays q8_0). A GGUF LoRA takes f16 or bf16 only.
        template: the prompt format the adapter was trained with, written as the GGUF's chat template and into
            the Modelfile: "qlora" (default, as training's default: "### Human: … ### Assistant:") or "chat" (the
            tokenizer's own chat template).
        base_gguf: for "gguf-lora": the base as GGUF (a path relative to the output's folder, or an Ollama model
            name) for the Modelfile's FROM. Not given: the unmerged base is written as `<output>.base.gguf`
            beside the adapter, so that `ollama create` works as it is.
        from_quantized, quant, device: merge into the dequantized NF4 base instead (see `export_merged`); not
            for "gguf-lora", which holds no base weights.
        max_shard_size: largest safetensors shard of an "hf" export.
        allow_other_base: skip the check that the adapter was trained on `base`.
        overwrite: replace outputs that exist.
    """
    if format not in get_args(ExportFormat):
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(get_args(ExportFormat))}")
    if format == "hf" and output.lower().endswith(".gguf"):
        raise ValueError(
            f"--output {output} names a .gguf file but --format is hf, which writes a model folder: pass "
            "--format gguf (or gguf-lora) for a GGUF file, or name a folder"
        )
    if format == "hf":
        return export_merged(
            base=base,
            adapter=adapter,
            output=output,
            from_quantized=from_quantized,
            quant=quant,
            device=device,
            max_shard_size=max_shard_size,
            allow_other_base=allow_other_base,
            overwrite=overwrite,
        )
    try:
        from . import export_gguf
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"--format {format} needs the `gguf` package (llama.cpp's own writer): pip install gguf ({e})"
        ) from e
    found = checked_adapter(base, adapter, allow_other_base=allow_other_base)
    if format == "gguf":
        path = export_gguf.save_gguf(
            base,
            found,
            output,
            gguf_type=gguf_type,
            template=template,
            from_quantized=from_quantized,
            quant=quant,
            device=resolve_device(device),
            overwrite=overwrite,
        )
    else:
        if from_quantized:
            raise ValueError("from_quantized merges into the base; a GGUF LoRA holds the adapter alone")
        path = export_gguf.save_gguf_lora(
            base, found, output, gguf_type=gguf_type, template=template, base_gguf=base_gguf, overwrite=overwrite
        )
    print(f"{format} written to {path}, with an Ollama Modelfile beside it")
    return str(path)
