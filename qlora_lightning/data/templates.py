"""Prompt templates: how an `Example` is written as the source text the model reads before its answer.

- `qlora` (alias `guanaco`): the QLoRA model card's prompt, the default:
  "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,
  detailed, and polite answers to the user's questions.\\n### Human: {question} ### Assistant:"
- `alpaca`: Stanford Alpaca's prompt (with and without an input section).
- `chat`: the tokenizer's own chat template (`apply_chat_template` with the generation prompt); the target
  ends with the token the template writes after an assistant's reply (`end_of_turn_id`: Llama 3's `<|eot_id|>`,
  Qwen's `<|im_end|>`, Gemma's `<end_of_turn>`, Phi-3's `<|end|>`, Mistral's `</s>`), not the tokenizer's EOS,
  which for a base model's tokenizer is another token (`<|end_of_text|>`, `<|endoftext|>`, `<eos>`).

An example's `system` text, when not empty, replaces the template's default system sentence. The target
is the response, preceded by the template's `response_separator` (see `tokenize.py` for when it is
used). `format_prompt` renders a single user prompt exactly as training does, for generation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from .formats import Example

__all__ = [
    "Template",
    "TEMPLATES",
    "QLORA_SYSTEM",
    "get_template",
    "render_source",
    "format_prompt",
    "end_of_turn_id",
    "target_end_id",
]

QLORA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_SYSTEM_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class Template:
    """A prompt template.

    `render(example, tokenizer)` returns the source text. `response_separator` is written between the
    source and the response ("### Assistant:" is followed by " answer"). `renders_special_tokens` is true
    when the rendered text already holds the tokenizer's special tokens (chat templates write their own
    BOS), so tokenization must not add them again.
    """

    name: str
    render: Callable[[Example, PreTrainedTokenizerBase | None], str]
    response_separator: str
    renders_special_tokens: bool = False


def _question(example: Example) -> str:
    """The user's text for templates without an input section: prompt, then context when there is one."""
    return f"{example.prompt}\n\n{example.context}" if example.context else example.prompt


def _render_qlora(example: Example, tokenizer: PreTrainedTokenizerBase | None) -> str:
    system = example.system or QLORA_SYSTEM
    past = "".join(f"### Human: {user} ### Assistant: {reply} " for user, reply in example.history)
    return f"{system}\n{past}### Human: {_question(example)} ### Assistant:"


def _render_alpaca(example: Example, tokenizer: PreTrainedTokenizerBase | None) -> str:
    system = example.system or (ALPACA_SYSTEM_INPUT if example.context else ALPACA_SYSTEM)
    past = "".join(f"### Instruction:\n{user}\n\n### Response: {reply}\n\n" for user, reply in example.history)
    context = f"### Input:\n{example.context}\n\n" if example.context else ""
    return f"{system}\n\n{past}### Instruction:\n{example.prompt}\n\n{context}### Response:"


def _render_chat(example: Example, tokenizer: PreTrainedTokenizerBase | None) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat' needs a tokenizer that has a chat template (tokenizer.chat_template)")
    messages = [{"role": "system", "content": example.system}] if example.system else []
    for user, reply in example.history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": _question(example)})
    try:
        return cast(str, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))  # text
    except TemplateError as e:  # e.g. Gemma 2's "System role not supported"
        hint = " (this example has a system text: leave it out, or use data.template qlora)" if example.system else ""
        raise ValueError(
            f"data.template chat: the chat template of tokenizer {tokenizer.name_or_path!r} refused an example: "
            f"{e}{hint}; question: {_question(example)[:80]!r}"
        ) from e


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the tokenizer's chat template writes right after an assistant's reply (its end of turn),
    or None without a chat template or where the template writes no special token there.

    Found by rendering a user turn and a reply and reading what follows the reply, so that any family's template
    is read the same way, whatever it calls its token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    reply = "\U000f0001"  # a private-use character: no template writes it
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": reply}]
    rendered = cast(str, tokenizer.apply_chat_template(messages, tokenize=False))  # tokenize=False: the text
    after = rendered[rendered.index(reply) + len(reply) :] if reply in rendered else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    specials = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[0] if ids and ids[0] in specials else None


def target_end_id(tokenizer: PreTrainedTokenizerBase, template: str) -> int:
    """The token that ends every training target under `template`: the chat template's end of turn under `chat`
    (the model learns to end its turn as the template's conversations do, and generation stops there), the
    tokenizer's EOS otherwise and where the template writes no special token after a reply."""
    if get_template(template).renders_special_tokens and (found := end_of_turn_id(tokenizer)) is not None:
        return found
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; the target must end with one")
    return tokenizer.eos_token_id


TEMPLATES: dict[str, Template] = {
    "qlora": Template("qlora", _render_qlora, response_separator=" "),
    "alpaca": Template("alpaca", _render_alpaca, response_separator=" "),
    "chat": Template("chat", _render_chat, response_separator="", renders_special_tokens=True),
}
TEMPLATES["guanaco"] = TEMPLATES["qlora"]


def get_template(name: str) -> Template:
    """The template registered as `name`; a clear error listing the known ones otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}") from None


def render_source(example: Example, template: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The source text of `example` under `template` (the tokenizer is needed by `chat` only)."""
    return get_template(template).render(example, tokenizer)


def format_prompt(
    question: str,
    template: str = "qlora",
    *,
    system: str = "",
    context: str = "",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    """Render one user prompt for generation exactly as training renders a source.

    Tokenize the result with `tokenize.encode_prompt` so that BOS is handled as in training too.
    """
    return render_source(Example(prompt=question, response="", system=system, context=context), template, tokenizer)
