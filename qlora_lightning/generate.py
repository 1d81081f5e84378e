"""Text generation with a (Q)LoRA model: prompt templates, left-padded batches, greedy or nucleus sampling.

Prompts are written with the training templates (`data.templates.format_prompt`, the model card's
"### Human: … ### Assistant:" by default, or the tokenizer's chat template) and encoded with the same
special prefix as in training (`data.tokenize.encode_prompt`). Decoding is transformers' own
`model.generate` with the KV cache; `inference_mode` switches a model loaded for training (train mode,
gradient checkpointing, `use_cache=False`) to evaluation and back. `answer_batch` is what `predict` runs on the
held-out split's training batches.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from transformers import (
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TextIteratorStreamer,
)

from .data.templates import end_of_turn_id, format_prompt
from .data.tokenize import encode_prompt
from .model import load_for_inference
from .specs import QuantSpec


@contextlib.contextmanager
def inference_mode(model: PreTrainedModel, *, use_cache: bool = True):
    """Eval mode (no dropout, no activation checkpointing), KV cache on, no autograd; restored on exit.

    `no_grad` rather than `torch.inference_mode`: the callback runs this mid-training, and tensors a layer
    might cache during an inference-mode call could not take part in the next backward.
    """
    was_training, cached = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = use_cache
    try:
        with torch.no_grad():
            yield model
    finally:
        model.config.use_cache = cached
        model.train(was_training)


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, template: str | None) -> list[int]:
    """Token ids of `prompt` written with `template` (None: the raw text), special prefix as in training."""
    if template is None:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return encode_prompt(tokenizer, format_prompt(prompt, template, tokenizer=tokenizer), template)


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with rows right-aligned, so every row's next token comes at the same step."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS, its chat template's end-of-turn token (`templates.end_of_turn_id`: what a `chat`
    target ends with, e.g. Llama 3's `<|eot_id|>` beside a base tokenizer's `<|end_of_text|>`) and the model's
    generation-config EOS ids (chat models end a turn with the latter)."""
    ids = [i for i in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)) if i is not None]
    extra = getattr(model.generation_config, "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra] if extra is not None else []
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config has an EOS token to stop at")
    return sorted(set(ids))


def check_settings(*, max_new_tokens: int, temperature: float, top_p: float, batch_size: int) -> None:
    """Raise naming the setting when one is outside what generation can use (checked before any model loads):
    transformers would otherwise accept `top_p 2` silently (no nucleus at all) or fail deep inside with a message
    about something else (`batch_size 0`: "range() arg 3 must not be zero")."""
    problems = []
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        problems.append(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        problems.append(f"temperature must be > 0 (greedy decoding is --sample false), got {temperature!r}")
    if not (0 < top_p <= 1):
        problems.append(f"top_p must be in (0, 1] (1 keeps every token), got {top_p!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        problems.append(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if problems:
        raise ValueError("generate: " + "; ".join(problems))


def generation_config(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int,
    sample: bool,
    temperature: float,
    top_p: float,
    eos_token_id: int | list[int] | None,
) -> GenerationConfig:
    """A fresh `GenerationConfig` (the checkpoint's own sampling defaults are not inherited)."""
    eos = stop_ids(model, tokenizer) if eos_token_id is None else eos_token_id
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample else dict(do_sample=False)
    return GenerationConfig(
        max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling
    )


def _cut_at_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device):
    """Draw sampled tokens from `seed` (reproducible answers) without touching the caller's random streams: the
    global CPU and `device` generators are forked for the block and restored after it. None: draw as they are."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(seed)
        yield


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: str | Sequence[str],
    *,
    template: str | None = "qlora",
    max_new_tokens: int = 256,
    sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    batch_size: int = 8,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    streamer=None,
) -> list[str]:
    """The model's answers to `prompts` (prompt text excluded, special tokens removed).

    Args:
        model / tokenizer: a causal LM (with or without our LoRA layers) and its tokenizer.
        prompts: one prompt or several; several are generated in left-padded batches of `batch_size` (>= 1).
        template: "qlora" (the model card's "### Human: … ### Assistant:", what our training writes),
            "chat" (the tokenizer's chat template), "alpaca", or None for the raw text.
        max_new_tokens: most tokens generated per prompt (>= 1).
        sample: nucleus sampling instead of greedy decoding (greedy is deterministic: the default).
        temperature / top_p: sampling settings (temperature > 0, top_p in (0, 1]; `check_settings`); 0.7 and 0.9
            are the paper's for Guanaco's generations.
        seed: the random seed of each batch's sampling, for reproducible answers (`seeded`: the caller's random
            streams are left as they were).
        eos_token_id: ids that end a generation; None: the tokenizer's EOS, its chat template's end of turn and the
            model's (`stop_ids`).
        streamer: a transformers streamer (e.g. `TextStreamer`) fed as tokens come; batch size 1 only.
    """
    check_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if streamer is not None and len(prompts) != 1:
        raise ValueError("a streamer follows one sequence; pass one prompt (or use `stream`)")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; load it with qlora_lightning.tokenizer.load_tokenizer")
    config = generation_config(
        model,
        tokenizer,
        max_new_tokens=max_new_tokens,
        sample=sample,
        temperature=temperature,
        top_p=top_p,
        eos_token_id=eos_token_id,
    )
    stops = set(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
    device = next(model.parameters()).device
    encoded = [encode(tokenizer, p, template) for p in prompts]
    answers = []
    with inference_mode(model):
        for start in range(0, len(encoded), batch_size):
            rows = encoded[start : start + batch_size]
            input_ids, attention_mask = left_pad(rows, tokenizer.pad_token_id, device)
            with seeded(seed, device):
                out = cast(GenerationMixin, model).generate(  # a causal LM's class mixes it in
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config, streamer=streamer
                )
            for row in out[:, input_ids.shape[1] :].tolist():
                answers.append(cast(str, tokenizer.decode(_cut_at_stop(row, stops), skip_special_tokens=True)))
    return answers


def answer_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch: dict[str, torch.Tensor], max_new_tokens: int
) -> list[dict[str, str]]:
    """Greedy answers to a training batch's prompts (the tokens before each row's first label), with references:
    what `predict` returns (`QLoRAModule.predict_step`), one `{"prompt", "answer", "reference"}` per row.

    Rows are right-padded by the collator, so a prompt is the prefix up to the first labelled token; with
    `train_on_source` every token is labelled and prompts cannot be told apart: an error naming the setting.
    Compiled layers would recompile for every cache length while generating token by token: they run eagerly here.
    """
    rows = []
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        labelled = (labels != -100).nonzero()
        if len(labelled) == 0 or labelled[0].item() == 0:
            raise ValueError("predict needs prompts without labels: set data.train_on_source false")
        start = labelled[0].item()
        prompt = cast(str, tokenizer.decode(ids[:start], skip_special_tokens=True))  # one row in, one text out
        rows.append((prompt, cast(str, tokenizer.decode(ids[labels != -100], skip_special_tokens=True))))
    with torch.compiler.set_stance("force_eager"):
        answers = generate(model, tokenizer, [p for p, _ in rows], template=None, max_new_tokens=max_new_tokens)
    return [{"prompt": p, "answer": a, "reference": r} for (p, r), a in zip(rows, answers, strict=True)]


def stream(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, **kwargs) -> Iterator[str]:
    """Yield the answer to one prompt piece by piece as it is generated (`generate`'s keyword arguments)."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            generate(model, tokenizer, prompt, streamer=streamer, **kwargs)
        except BaseException as e:  # re-raised in the consumer's thread below
            errors.append(e)
            streamer.on_finalized_text("", stream_end=True)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


def generate_cli(
    *,
    base: str,
    prompt: str | list[str],
    adapter: str | None = None,
    template: str | None = "qlora",
    max_new_tokens: int = 256,
    sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 8,
    stream_output: bool = True,
    quant: QuantSpec = QuantSpec(),
    device: str = "auto",
    allow_other_base: bool = False,
) -> list[str]:
    """Answer prompts with a base model and (optionally) a PEFT LoRA adapter; print the answers.

    Args:
        base: hub id, local folder or `builtin:` name of the base model.
        prompt: the prompt, or several (`--prompt+ "…" --prompt+ "…"`).
        adapter: a PEFT LoRA adapter folder (ours or published); None generates with the base alone.
        template: "qlora" (the model card's prompt, what training writes), "chat" (the tokenizer's chat
            template), "alpaca", or None for the raw text.
        max_new_tokens: most tokens generated per prompt (>= 1).
        sample: nucleus sampling instead of greedy decoding (greedy, deterministic, by default).
        temperature: sampling temperature, > 0 (0.7, the paper's for Guanaco).
        top_p: nucleus size, in (0, 1] (0.9, the paper's for Guanaco).
        seed: RNG seed, so that sampled answers can be reproduced.
        batch_size: prompts per left-padded batch when not streaming (>= 1).
        stream_output: print tokens as they come, one prompt after another; off: batch all prompts and
            print each answer when done.
        quant: how the base is stored, as in training (`--quant.quantize nf4|fp4|none`, `--quant.compute_dtype`:
            "float32" is faster on CPUs without bf16 instructions).
        device: "auto" (CUDA if present, else CPU), "cpu", "cuda:0", ...
        allow_other_base: skip the check that the adapter was trained on `base`.
    """
    check_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    loaded = load_for_inference(base, adapter, quant=quant, device=device, allow_other_base=allow_other_base)
    tokenizer = loaded.text_tokenizer()
    kwargs: dict[str, Any] = dict(
        template=template, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p, seed=seed
    )
    answers = []
    if stream_output:
        for p in prompts:
            print(f"### {p}", flush=True)
            pieces = []
            for piece in stream(loaded.model, tokenizer, p, **kwargs):
                pieces.append(piece)
                print(piece, end="", flush=True)
            print(flush=True)
            answers.append("".join(pieces))
    else:
        answers = generate(loaded.model, tokenizer, prompts, batch_size=batch_size, **kwargs)
        for p, a in zip(prompts, answers, strict=True):
            print(f"### {p}\n{a}", file=sys.stdout, flush=True)
    return answers
