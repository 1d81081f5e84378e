"""Dataset formats: one raw record (a dict) becomes one or more `Example`s.

A format only reads and checks fields; how an `Example` is shown to the model is the template's job
(`templates.py`). Each format is one function registered with `@register_format`, so adding a dataset
layout is one decorated function. Problems with a record raise `RecordError` naming the field; the
loader (`datamodule.py`) adds the file and line or row.

Which of the paper's datasets use which format:
- `openorca`: OpenOrca (`system_prompt`, `question`, `response`).
- `alpaca`: Alpaca, Self-Instruct, Unnatural Instructions (`instruction`, `input`, `output`).
- `oasst1`: OASST1 / Guanaco (`text` with `### Human:` / `### Assistant:` turns), and HH-RLHF once its
  `chosen` conversations are written in that layout.
- `input_output`: generic `input`/`output` records; Longform, Chip2 and FLAN v2 as qlora.py prepares them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Example", "RecordError", "FORMATS", "register_format", "get_format", "format_record", "text_field"]


@dataclass(frozen=True)
class Example:
    """One training example before templating.

    `prompt` is the user's request, `context` an optional extra input shown with it (Alpaca's `input`),
    `response` the answer the model is trained on. `system` replaces the template's default system
    sentence when not empty (OpenOrca's `system_prompt`). `history` holds earlier (user, assistant) turns
    of a conversation; they are part of the source, never of the target.
    """

    prompt: str
    response: str
    system: str = ""
    context: str = ""
    history: tuple[tuple[str, str], ...] = ()


class RecordError(ValueError):
    """A record cannot be used; `field` names the offending field (None when the record as a whole is bad)."""

    def __init__(self, field: str | None, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"field {field!r}: {problem}" if field else problem)


FormatFn = Callable[[Mapping], list[Example]]
FORMATS: dict[str, FormatFn] = {}


def register_format(name: str) -> Callable[[FormatFn], FormatFn]:
    """Register `fn(record) -> list[Example]` under `name` (the datamodule's `format` value)."""

    def deco(fn: FormatFn) -> FormatFn:
        if name in FORMATS:
            raise ValueError(f"format {name!r} is already registered")
        FORMATS[name] = fn
        return fn

    return deco


def get_format(name: str) -> FormatFn:
    """The format function registered as `name`; a clear error listing the known ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(sorted(FORMATS))}") from None


def format_record(record: object, format: str) -> list[Example]:
    """Check that `record` is a mapping and run the `format` function on it."""
    if not isinstance(record, Mapping):
        raise RecordError(None, f"expected a JSON object (a mapping of field names), got {type(record).__name__}")
    return get_format(format)(record)


def text_field(record: Mapping, name: str, *, required: bool = True, allow_empty: bool = False) -> str:
    """Read string field `name`: missing/None is an error when `required` (else ""), non-strings always are.

    Empty or whitespace-only values are errors unless `allow_empty`, because an empty prompt or response
    gives an example with nothing to learn (and an empty target would be all EOS). Text that cannot be
    written as UTF-8 (a lone surrogate) is an error too, as the tokenizer would fail on it.
    """
    value = record.get(name)
    if value is None:
        if required:
            raise RecordError(name, "missing" if name not in record else "is null")
        return ""
    if not isinstance(value, str):
        raise RecordError(name, f"must be a string, got {type(value).__name__} ({value!r:.40})")
    if not allow_empty and not value.strip():
        raise RecordError(name, "is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate such as JSON's "\ud800": valid JSON, invalid text
        raise RecordError(name, f"is not valid text: lone surrogate {value[e.start]!r} at index {e.start}") from None
    return value


@register_format("openorca")
def openorca(record: Mapping) -> list[Example]:
    """OpenOrca: `question` and `response` required; `system_prompt` optional (empty = template default)."""
    return [
        Example(
            system=text_field(record, "system_prompt", required=False, allow_empty=True).strip(),
            prompt=text_field(record, "question"),
            response=text_field(record, "response"),
        )
    ]


@register_format("alpaca")
def alpaca(record: Mapping) -> list[Example]:
    """Alpaca: `instruction` and `output` required; `input` optional (the Alpaca prompt has two variants)."""
    return [
        Example(
            prompt=text_field(record, "instruction"),
            context=text_field(record, "input", required=False, allow_empty=True).strip(),
            response=text_field(record, "output"),
        )
    ]


@register_format("input_output")
def input_output(record: Mapping) -> list[Example]:
    """Generic JSONL: `input` (the prompt) and `output` (the answer), both required and non-empty."""
    return [Example(prompt=text_field(record, "input"), response=text_field(record, "output"))]


_TURN = re.compile(r"###\s*(Human|Assistant):")


@register_format("oasst1")
def oasst1(record: Mapping) -> list[Example]:
    """OASST1/Guanaco `text`: one example per assistant turn, the conversation before it as history.

    This trains on every assistant turn (the paper trains on the assistant's replies) while keeping the
    source/target split, so each reply gets the same truncation limits and masking as single-turn data.
    Text before the first marker is not allowed; turns must alternate, starting with the human.
    """
    text = text_field(record, "text")
    parts = _TURN.split(text)
    if parts[0].strip():
        raise RecordError("text", "must start with '### Human:'")
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    if not turns:
        raise RecordError("text", "has no '### Human:' / '### Assistant:' turns")
    examples: list[Example] = []
    history: list[tuple[str, str]] = []
    for k, (role, content) in enumerate(turns):
        expected = "Human" if k % 2 == 0 else "Assistant"
        if role != expected:
            raise RecordError("text", f"turn {k + 1} is '### {role}:' but '### {expected}:' was expected")
        if not content:
            raise RecordError("text", f"turn {k + 1} ('### {role}:') is empty")
        if role == "Assistant":
            user = turns[k - 1][1]
            examples.append(Example(prompt=user, response=content, history=tuple(history)))
            history.append((user, content))
    if not examples:
        raise RecordError("text", "has no '### Assistant:' turn to train on")
    return examples
