"""Tokens and batches: source/target encoding with the QLoRA limits, and the collator (padded or packed rows).

Layout of one example (as in qlora.py): `[BOS?] source[:384] | target[:128]` where the target is the
response followed by EOS (under the `chat` template: by the template's end-of-turn token,
`templates.target_end_id`). The source gets the special prefix the tokenizer itself adds to text (BOS for
LLaMA, nothing for SmolLM2), never twice; chat templates write their own. EOS is part of the target's
128 tokens: a response cut by the limit loses its EOS, so the model is never taught to stop mid-answer.
Labels are -100 on the source (unless `train_on_source`) and on padding; padding is masked by position,
never by token id, because pad may equal EOS and EOS must stay labelled. A packed (padding-free) batch
puts a micro-batch's examples end to end in one row instead (see `InstructionCollator`).

The data's text is never parsed for special tokens: `<|im_end|>` written inside a question or response is
tokenized as the characters it is (`split_special_tokens`), as the model card's recipe treats text, so data
cannot end a target early or open a turn. The only special tokens of a row are the prefix, the `chat`
template's own (around the texts it renders) and the final EOS.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Literal, cast

import torch
from transformers import PreTrainedTokenizerBase

from .formats import Example
from .templates import Template, format_prompt, get_template, target_end_id

__all__ = [
    "IGNORE_INDEX",
    "special_prefix",
    "special_token_strings",
    "encode_text",
    "encode_sources",
    "ExampleEncoder",
    "encode_prompt",
    "sequence_boundaries",
    "InstructionCollator",
]

IGNORE_INDEX = -100  # the label value torch's cross-entropy ignores


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before any text by default (e.g. [BOS] for LLaMA, [] for SmolLM2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k])
    raise ValueError(f"cannot find the special prefix of tokenizer {tokenizer.name_or_path!r}: {full} vs {plain}")


def special_token_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The strings a tokenizer turns into special tokens when it parses text (its named special tokens and every
    added token marked special), longest first so that a pattern of them matches as the tokenizer does."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    found = set(tokenizer.all_special_tokens) | {token.content for token in added if token.special}
    return sorted(found, key=lambda text: (-len(text), text))


def encode_text(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of plain texts, without a special prefix; a special token's string inside them stays text."""
    return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _texts(example: Example) -> list[str]:
    """Every text of an example that came from the data (not from a template)."""
    return [
        example.prompt,
        example.response,
        example.system,
        example.context,
        *(t for turn in example.history for t in turn),
    ]


def _map_texts(example: Example, fn: Callable[[str], str]) -> Example:
    """`example` with `fn` applied to each of its texts."""
    return replace(
        example,
        prompt=fn(example.prompt),
        response=fn(example.response),
        system=fn(example.system),
        context=fn(example.context),
        history=tuple((fn(user), fn(reply)) for user, reply in example.history),
    )


def _unused_characters(texts: Sequence[str], n: int) -> list[str]:
    """`n` private-use characters that occur in none of `texts` (stand-ins that cannot be confused with data)."""
    used = set("".join(texts))
    free = (chr(c) for c in range(0xF0000, 0x10FFFE) if chr(c) not in used)
    return [next(free) for _ in range(n)]


def _pieces(pattern: re.Pattern, text: str) -> Iterator[tuple[str, bool]]:
    """`text` as consecutive (piece, matched) pairs: the matches of `pattern` and the text between them."""
    at = 0
    for m in pattern.finditer(text):
        if m.start() > at:
            yield text[at : m.start()], False
        yield m.group(), True
        at = m.end()
    if at < len(text):
        yield text[at:], False


def _encode_chat_source(
    tokenizer: PreTrainedTokenizerBase, template: Template, example: Example, specials: re.Pattern
) -> list[int]:
    """The source of an example whose texts hold special-token strings (`specials` matches them), under a template
    that renders special tokens: each such string is rendered as a private stand-in character, so that every special
    token left in the rendered text is the template's; the text between those is tokenized as plain text, stand-ins
    restored. Byte-level tokenizers split text at special tokens the same way, so such a record encodes as it would
    whole; one that marks only a text's first word (SentencePiece's "first" prefix scheme) gives the piece after each
    template token a word marker that the whole text would not have."""
    found = sorted({m.group() for text in _texts(example) for m in specials.finditer(text)})
    stand_ins = dict(zip(found, _unused_characters(_texts(example), len(found)), strict=True))
    originals = {c: s for s, c in stand_ins.items()}
    show = re.compile("|".join(originals))
    rendered = template.render(
        _map_texts(example, lambda t: specials.sub(lambda m: stand_ins[m.group()], t)), tokenizer
    )
    ids: list[int] = []
    for piece, special in _pieces(specials, rendered):
        if special:
            ids.append(cast(int, tokenizer.convert_tokens_to_ids(piece)))  # one token in, one id out
        else:
            ids += encode_text(tokenizer, [show.sub(lambda m: originals[m.group()], piece)])[0]
    return ids


def encode_sources(
    tokenizer: PreTrainedTokenizerBase, template: Template, examples: Sequence[Example]
) -> list[list[int]]:
    """Token ids of each example's source (without the special prefix), the data's texts never parsed for special
    tokens. Templates that render none encode the whole source as plain text; the `chat` template keeps its own
    special tokens, and a record without special-token strings is encoded in one call as the rendered text."""
    sources = [template.render(ex, tokenizer) for ex in examples]
    if not template.renders_special_tokens:
        return encode_text(tokenizer, sources)
    out = tokenizer(sources, add_special_tokens=False)["input_ids"]
    if strings := special_token_strings(tokenizer):
        specials = re.compile("|".join(map(re.escape, strings)))
        for i, example in enumerate(examples):
            if any(specials.search(text) for text in _texts(example)):
                out[i] = _encode_chat_source(tokenizer, template, example, specials)
    return out


def _marks_word_start(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether a text tokenized alone already starts as a new word (SentencePiece's '▁', add_prefix_space).

    Such tokenizers would turn the template's " " separator into an extra space token, so it is dropped.
    """
    first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])[0]
    return first.startswith(("▁", "Ġ"))


def _separator(tokenizer: PreTrainedTokenizerBase, template: Template) -> str:
    """The text written between source and response for this tokenizer and template."""
    if template.response_separator.isspace() and _marks_word_start(tokenizer):
        return ""
    return template.response_separator


class ExampleEncoder:
    """Turns `Example`s into `input_ids` plus `n_source` (how many leading ids are the source), and counts
    the tokens the length limits cut off.

    `source_max_len`/`target_max_len` default to the paper's 384/128. `source_truncation="right"` keeps
    the start of a long source, as qlora.py does; "left" keeps its end (the prompt's "### Assistant:"
    cue stays next to the answer) and still keeps the special prefix.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: str = "qlora",
        source_max_len: int = 384,
        target_max_len: int = 128,
        source_truncation: Literal["right", "left"] = "right",
    ):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; the target must end with one")
        if source_truncation not in ("right", "left"):
            raise ValueError(f"source_truncation must be 'right' or 'left', got {source_truncation!r}")
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.prefix = [] if self.template.renders_special_tokens else special_prefix(tokenizer)
        if source_max_len <= len(self.prefix) or target_max_len < 1:
            raise ValueError(
                f"source_max_len ({source_max_len}) must exceed the special prefix ({len(self.prefix)} tokens) "
                f"and target_max_len ({target_max_len}) must be at least 1"
            )
        self.source_max_len = source_max_len
        self.target_max_len = target_max_len
        self.source_truncation = source_truncation
        self.separator = _separator(tokenizer, self.template)
        self.end_id = target_end_id(tokenizer, template)
        self.template.render(Example(prompt="?", response="!"), tokenizer)  # fail now, not per record

    def _truncate_source(self, ids: list[int]) -> list[int]:
        room = self.source_max_len - len(self.prefix)
        if len(ids) > room:
            ids = ids[:room] if self.source_truncation == "right" else ids[len(ids) - room :]
        return self.prefix + ids

    def encode(self, examples: Sequence[Example]) -> dict[str, list]:
        """Encode a batch: {"input_ids": [[...]], "n_source": [...], "source_cut": [...], "target_cut": [...]}.

        `source_cut`/`target_cut` count the tokens each example lost to `source_max_len`/`target_max_len`
        (0 where it fits; the cut target's lost EOS counts). Batched for speed.
        """
        tok = self.tokenizer
        src_ids = encode_sources(tok, self.template, examples)
        tgt_ids = encode_text(tok, [self.separator + ex.response for ex in examples])
        out: dict[str, list] = {"input_ids": [], "n_source": [], "source_cut": [], "target_cut": []}
        for s, t in zip(src_ids, tgt_ids, strict=True):
            t = t + [self.end_id]
            out["source_cut"].append(max(0, len(self.prefix) + len(s) - self.source_max_len))
            out["target_cut"].append(max(0, len(t) - self.target_max_len))
            s = self._truncate_source(s)
            out["input_ids"].append(s + t[: self.target_max_len])
            out["n_source"].append(len(s))
        return out


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, template: str = "qlora") -> list[int]:
    """Token ids of a prompt from `templates.format_prompt`, exactly as training encodes that source: the special
    prefix, and the user's text never parsed for special tokens (under `chat`, the template's own stay special)."""
    found = get_template(template)
    if not found.renders_special_tokens:
        return special_prefix(tokenizer) + encode_text(tokenizer, [prompt])[0]
    return encode_sources(tokenizer, found, [_chat_prompt_example(tokenizer, prompt, template)])[0]


def _chat_prompt_example(tokenizer: PreTrainedTokenizerBase, prompt: str, template: str) -> Example:
    """The question (and system text) that `format_prompt(question, template, system=...)` rendered as `prompt`,
    found by matching `prompt` with the template rendered around stand-ins (a system text is taken to end at the
    template's first separator after it)."""
    question, system = _unused_characters([prompt], 2)
    for given_system in ("", system):
        skeleton = format_prompt(question, template, system=given_system, tokenizer=tokenizer)
        pattern = ""
        for i, part in enumerate(re.split(f"({question}|{system})", skeleton)):
            name = "question" if part == question else "system"
            if i % 2 == 0:
                pattern += re.escape(part)
            else:  # a text the template repeats must be the same text again
                pattern += f"(?P={name})" if f"(?P<{name}>" in pattern else f"(?P<{name}>.*?)"
        if found := re.fullmatch(pattern, prompt, re.DOTALL):
            return Example(prompt=found["question"], response="", system=found.groupdict().get("system") or "")
    raise ValueError(
        f"the prompt {prompt[:80]!r} is not what format_prompt(question, {template!r}, system=...) renders with this "
        "tokenizer's chat template; render it with templates.format_prompt"
    )


def sequence_boundaries(lengths: Sequence[int]) -> torch.Tensor:
    """Cumulative lengths of examples of `lengths` tokens packed end to end, [0, l0, l0 + l1, …], in int32 as the
    variable-length attention kernels take them."""
    bounds = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    bounds[1:] = torch.as_tensor(list(lengths), dtype=torch.int32).cumsum(0)
    return bounds


class InstructionCollator:
    """Collates rows of `input_ids`/`n_source` into a batch: padded (one row per example) or packed.

    Labels are the ids of the response (and its EOS), or of every token with `train_on_source` (false, the
    paper's default, learns the response only), and `IGNORE_INDEX` elsewhere. All tensors are int64.

    Padded (default): `input_ids`, `attention_mask` and `labels` of shape (examples, width), right padded to
    the longest row, rounded up to a multiple of `pad_to_multiple_of` (8 keeps shapes friendly to tensor cores;
    None pads to the longest row only).

    Packed (`padding_free`): ONE row holding the examples end to end: `input_ids`, `position_ids` and `labels` of
    shape (1, total), plus `num_examples` (shape (), how many examples the row holds, for examples/s) and the
    examples' boundaries for variable-length attention (`attention.varlen_attention`): `cu_seq_lens_q` and
    `cu_seq_lens_k` (int32 cumulative lengths, the padding tail's boundary always included, so that every row of a
    micro-batch size has as many) and `max_length_q` / `max_length_k` (`max_length`, the longest an example can be:
    one constant, so compiled layers are not recompiled for each row's longest example). Positions restart at 0
    with every example and there is no `attention_mask`, so no example attends to another: through the boundaries,
    or, for a model whose attention takes none, through the block-diagonal causal mask transformers builds from the
    positions (a mask of ones would defeat that, and so does a KV cache, which transformers makes unless the model
    runs with `use_cache=False`). The loss predicts
    `labels[t + 1]` from position t, so each example's first token is labelled `IGNORE_INDEX`, also with
    `train_on_source`: no token is predicted from the end of the previous example. (The padded layout never uses a
    row's first label either, so both layouts predict the same tokens from the same contexts.) `pad_to_multiple_of`
    rounds up the total length: the end is filled with pad ids forming one more sequence (positions from 0, labels
    ignored), so the shape stays tensor-core friendly and no example attends to the padding.
    """

    def __init__(
        self,
        pad_token_id: int,
        train_on_source: bool = False,
        pad_to_multiple_of: int | None = 8,
        padding_free: bool = False,
        max_length: int | None = None,
    ):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; load it with qlora_lightning.tokenizer.load_tokenizer")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.train_on_source = train_on_source
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = padding_free
        self.max_length = max_length  # packed rows: the bound passed as max_length_q/k (None: the row's longest)

    def _rounded(self, length: int) -> int:
        """`length` rounded up to a multiple of `pad_to_multiple_of` (unchanged when None)."""
        if self.pad_to_multiple_of:
            return -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return length

    def _label_start(self, row: dict) -> int:
        """Index of the row's first labelled token."""
        return 0 if self.train_on_source else int(row["n_source"])

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor | int]:
        if self.padding_free:
            return self._pack(rows)
        width = self._rounded(max(len(r["input_ids"]) for r in rows))
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            n = len(ids)
            input_ids[i, :n] = ids
            attention_mask[i, :n] = 1
            start = self._label_start(row)
            labels[i, start:n] = ids[start:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _pack(self, rows: Sequence[dict]) -> dict[str, torch.Tensor | int]:
        """The packed layout (see the class docstring)."""
        total = sum(len(r["input_ids"]) for r in rows)
        width = self._rounded(total)
        input_ids = torch.full((1, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((1, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.empty((1, width), dtype=torch.long)
        at, lengths = 0, []
        for row in rows:
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            n = len(ids)
            input_ids[0, at : at + n] = ids
            position_ids[0, at : at + n] = torch.arange(n)
            start = max(1, self._label_start(row))  # the first token is never predicted from the previous example
            labels[0, at + start : at + n] = ids[start:]
            at += n
            lengths.append(n)
        position_ids[0, at:] = torch.arange(width - at)  # the padding: a sequence of its own
        lengths.append(width - at)
        bounds = sequence_boundaries(lengths)
        longest = self.max_length if self.max_length is not None else max(lengths)
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "labels": labels,
            "num_examples": torch.tensor(len(rows)),
            "cu_seq_lens_q": bounds,
            "cu_seq_lens_k": bounds,
            "max_length_q": longest,
            "max_length_k": longest,
        }
