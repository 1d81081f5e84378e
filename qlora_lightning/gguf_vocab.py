"""The tokenizer as GGUF metadata: llama.cpp's tokenizer kind, vocabulary, token types, scores, merges, special
tokens and chat template (the `tokenizer.ggml.*` and `tokenizer.chat_template` keys).

`gguf.vocab.SpecialVocab` (the gguf package's own reader, as llama.cpp's converter uses it) gives the merges and the
special token ids from the folder's files and writes them with the chat template; what it does not do lives here:
the vocabulary and token types from tokenizer.json, llama.cpp's pre-tokenizer name, the "llama" kind's scores,
whether BOS/EOS are added as the tokenizer itself adds them, and the "qlora" prompt as a Jinja chat template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple, cast

import gguf
from transformers import PreTrainedTokenizerBase

from .data.templates import QLORA_SYSTEM
from .data.tokenize import special_prefix
from .merge import GGUFTemplate

__all__ = ["Vocabulary", "vocabulary", "add_tokenizer", "end_of_turn", "chat_template"]

#: The special tokens a GGUF records, as the export has always written them (SpecialVocab would add sep, cls, mask).
SPECIAL_TOKEN_TYPES = ("bos", "eos", "unk", "pad")


# -------------------------------------------------------------------------------------------- vocabulary
class Vocabulary(NamedTuple):
    """The tokenizer as GGUF metadata: llama.cpp's tokenizer kind ("gpt2": byte-level BPE; "llama":
    SentencePiece-style BPE with byte fallback), its pre-tokenizer name, the tokens by id with their types and
    scores, and `special`: the merges (which transformers reads back; llama.cpp's "llama" kind ranks by score
    instead) and the special token ids, as `gguf.vocab.SpecialVocab` reads them from the folder."""

    model: str
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    special: gguf.SpecialVocab
    add_space_prefix: bool | None


def _parts(spec: dict | None) -> list[dict]:
    """A tokenizer.json normalizer or pre-tokenizer as the list of its steps (a Sequence flattened)."""
    if spec is None:
        return []
    if spec["type"] == "Sequence":
        return [step for part in spec.get("normalizers") or spec["pretokenizers"] for step in _parts(part)]
    return [spec]


def _pre_tokenizer_steps(spec: dict | None) -> tuple:
    """A byte-level tokenizer's pre-tokenizer as a tuple of steps that can be compared with known ones (a Split by
    its expression and behaviour; a ByteLevel without its own expression adds no step)."""
    steps: list[str | tuple] = []
    for part in _parts(spec):
        if part["type"] == "ByteLevel":
            steps += ["gpt2-regex"] if part.get("use_regex", True) else []
        elif part["type"] == "Digits":
            steps.append(("digits", bool(part.get("individual_digits"))))
        elif part["type"] == "Split" and "Regex" in part["pattern"]:
            steps.append(("split", part["pattern"]["Regex"], part.get("behavior"), bool(part.get("invert"))))
        else:
            steps.append(json.dumps(part, sort_keys=True))
    return tuple(steps)


#: The expressions Llama 3 and Qwen 2/2.5/3 split text with before merging (their tokenizer.json's Split step);
#: they differ in digits: up to three at a time, or one.
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: llama.cpp's name for each byte-level pre-tokenizer the export recognises (its `tokenizer.ggml.pre`, the name its
#: converter finds by hashing a test text's tokens); llama.cpp splits the text with the same expressions before
#: merging, so a file and the folder's tokenizer agree.
_BYTE_LEVEL_PRE = {
    ("gpt2-regex",): "gpt-2",  # GPT-2's expression alone (SmolLM2 as transformers rebuilds it from GGUF)
    (("digits", True), "gpt2-regex"): "smollm",  # each digit apart first (SmolLM2 and StarCoder as published)
    (("split", _LLAMA3_SPLIT, "Isolated", False),): "llama-bpe",  # Llama 3, 3.1, 3.2
    (("split", _QWEN2_SPLIT, "Isolated", False),): "qwen2",  # Qwen 2, 2.5, 3
}
#: Normalizers llama.cpp does not apply but that change no text already in their form, by pre-tokenizer name: Qwen's
#: NFC (text in NFC, as nearly all text is, tokenizes the same; decomposed accents may not).
_HARMLESS_NORMALIZERS = {"qwen2": ({"type": "NFC"},)}


def _byte_level_pre(tokenizer_json: dict, where: Path) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer.json, or an error when llama.cpp has none that
    splits text as it does (the file would load and tokenize differently)."""
    steps = _pre_tokenizer_steps(tokenizer_json.get("pre_tokenizer"))
    pre = _BYTE_LEVEL_PRE.get(steps)
    normalizer = tokenizer_json.get("normalizer")
    if pre is None or (normalizer is not None and normalizer not in _HARMLESS_NORMALIZERS.get(pre, ())):
        raise ValueError(
            f"{where}: this byte-level tokenizer's normalizer/pre-tokenizer ({normalizer}, {steps}) is not one the "
            f"GGUF export recognises ({', '.join(sorted(_BYTE_LEVEL_PRE.values()))}); llama.cpp would split text "
            "differently"
        )
    return pre


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


def _tokens_and_types(tokenizer_json: dict, where: Path, n_vocab: int) -> tuple[list[str], dict[int, gguf.TokenType]]:
    """One token per embedding row and its type: the BPE vocabulary NORMAL, added tokens CONTROL (special) or
    USER_DEFINED, the ids the tokenizer lacks UNUSED `[PAD<id>]`."""
    by_id = {index: token for token, index in tokenizer_json["model"]["vocab"].items()}
    types = {index: gguf.TokenType.NORMAL for index in by_id}
    for added in tokenizer_json.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(by_id) >= n_vocab:
        raise ValueError(f"{where}: token id {max(by_id)} is beyond the model's {n_vocab} embedding rows")
    for index in range(n_vocab):
        if index not in by_id:
            by_id[index], types[index] = f"[PAD{index}]", gguf.TokenType.UNUSED
    return [by_id[index] for index in range(n_vocab)], types


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
    tokens, types = _tokens_and_types(tokenizer_json, where, n_vocab)
    special = gguf.SpecialVocab(source_dir, load_merges=True, special_token_types=SPECIAL_TOKEN_TYPES, n_vocab=n_vocab)
    if not model.get("byte_fallback"):
        return Vocabulary(
            "gpt2",
            _byte_level_pre(tokenizer_json, where),
            tokens,
            [int(types[i]) for i in range(n_vocab)],
            None,
            special,
            None,
        )
    for index, token in enumerate(tokens):
        if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types[index] = gguf.TokenType.BYTE
        elif token == model.get("unk_token"):
            types[index] = gguf.TokenType.UNKNOWN
    rank: dict[str, int] = {}
    for position, merge in enumerate(special.merges):
        rank.setdefault(merge.replace(" ", ""), position)
    scores = [-float(rank.get(token, 0)) for token in tokens]
    return Vocabulary(
        "llama",
        None,
        tokens,
        [int(types[i]) for i in range(n_vocab)],
        scores,
        special,
        _adds_space_prefix(tokenizer_json),
    )


# -------------------------------------------------------------------------------------------- writing
def add_tokenizer(writer: gguf.GGUFWriter, vocab: Vocabulary, tokenizer: PreTrainedTokenizerBase, chat: str) -> None:
    """The `tokenizer.ggml.*` keys and `chat` as the chat template: vocabulary, merges and special token ids
    (`vocab.special` writes them), and whether BOS/EOS are added to a text.

    Whether BOS/EOS are added is measured on the folder's tokenizer itself (training's `special_prefix`: [BOS] for
    LLaMA-2, nothing for SmolLM2) and always written: SpecialVocab reads it from tokenizer_config.json or a
    TemplateProcessing post-processor only, and leaves it out where those are silent (SmolLM2's files), letting
    llama.cpp guess from the tokenizer kind.
    """
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    eos = [tokenizer.eos_token_id]
    vocab.special.add_special_token = {
        "bos": special_prefix(tokenizer) == [tokenizer.bos_token_id],
        "eos": full[-1:] == eos and plain[-1:] != eos,
    }
    if (eot := end_of_turn(tokenizer, chat)) not in (None, tokenizer.eos_token_id):
        vocab.special.special_token_ids["eot"] = eot
    vocab.special.chat_template = chat
    vocab.special.add_to_gguf(writer, quiet=True)


def end_of_turn(tokenizer: PreTrainedTokenizerBase, chat: str) -> int | None:
    """The special token that ends an answer under the chat template `chat` (Llama 3's `<|eot_id|>`, Qwen's
    `<|im_end|>`, Gemma's `<end_of_turn>`, Phi-3's `<|end|>`; EOS itself under "qlora"), or None if it ends with none.

    Found as chat clients find it: the first special token the template writes after a placeholder answer. The GGUF
    records it as `tokenizer.ggml.eot_token_id` when it is not EOS, so llama.cpp stops there whatever its own list of
    end-of-turn texts holds.
    """
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PLACEHOLDER}]
    try:
        text = cast(str, tokenizer.apply_chat_template(messages, chat_template=chat, tokenize=False))  # as text
    except Exception as e:  # jinja2's errors, and the template's own raise_exception
        raise ValueError(
            f"{tokenizer.name_or_path}: the chat template cannot render a user turn and an answer ({e})"
        ) from e
    after = text.split(_PLACEHOLDER, 1)[-1]
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return next((i for i in tokenizer(after, add_special_tokens=False)["input_ids"] if i in special), None)


#: The answer `end_of_turn` renders: text no template writes by itself.
_PLACEHOLDER = "PLACEHOLDER-ANSWER-7f3c"


# -------------------------------------------------------------------------------------- chat template
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
