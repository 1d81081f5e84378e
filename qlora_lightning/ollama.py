"""Ollama's Modelfile for an exported GGUF: the model (and a LoRA's adapter), the prompt format as an Ollama
template with its SYSTEM sentence, and the stop strings, so that `ollama create NAME -f Modelfile` needs no edit."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .data.templates import QLORA_SYSTEM
from .merge import GGUFTemplate

__all__ = ["MODELFILE", "OLLAMA_ADAPTER_NOTE", "ollama_modelfile", "stop_strings", "modelfile_path"]

#: The file name Ollama's `ollama create -f` is usually given, written beside the exported GGUF.
MODELFILE = "Modelfile"
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


def stop_strings(template: GGUFTemplate, tokenizer: PreTrainedTokenizerBase, chat: str) -> list[str]:
    """Where an answer ends: the EOS token training appends, the end-of-turn token of the chat template `chat` where
    that is another (Llama 3's `<|eot_id|>`, Qwen's `<|im_end|>`, Gemma's `<end_of_turn>`: `gguf_vocab.end_of_turn`),
    and for "qlora" the next "### Human:" turn."""
    from .gguf_vocab import end_of_turn

    eos = [tokenizer.eos_token] if tokenizer.eos_token else []
    eot = end_of_turn(tokenizer, chat)
    turn = [tokenizer.convert_ids_to_tokens(eot)] if eot is not None and eot != tokenizer.eos_token_id else []
    return eos + turn + (["### Human:"] if template == "qlora" else [])


def modelfile_path(path: Path, folder: Path) -> str:
    """`path` as a Modelfile writes it: relative to the Modelfile's folder (Ollama resolves it from there)."""
    return "./" + os.path.relpath(path, folder)
