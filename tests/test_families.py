"""The model families people tune today (Llama 3, Mistral, Qwen 2.5/3, Gemma 2/3, Phi-3), each as a tiny random
model with a real tokenizer of its family (tests/family_models.py): the fixtures themselves, training through the
CLI and the Python API with the family's chat template and end-of-turn token, bitwise resume, compiled and
offloaded layers, FSDP's unit class, stopping at the end of a turn, and the configs of configs/families/."""

from __future__ import annotations

import json

import pytest
from family_models import FAMILIES, FAMILY_SPECS

# What the published tokenizers give for "Hello world" (their own encodings, BOS where the family adds one).
HELLO_WORLD = {
    "llama3": [128000, 9906, 1917],
    "mistral": [1, 23325, 2294],
    "qwen2": [9707, 1879],
    "qwen3": [9707, 1879],
    "gemma3": [2, 9259, 1902],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fixture_is_the_family_with_its_real_tokenizer(family_model_dir, family):
    """Each fixture folder holds the family's architecture and a tokenizer of that family: its encodings, its chat
    template ending the assistant's turn with the family's end-of-turn token."""
    from transformers import AutoConfig, AutoTokenizer

    folder = family_model_dir(family)
    spec = FAMILY_SPECS[family]
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert config.model_type == spec.model_type
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (2, 64, len(tokenizer))
    assert config.tie_word_embeddings == spec.tie
    if family in HELLO_WORLD:
        assert tokenizer("Hello world").input_ids == HELLO_WORLD[family]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert f"Hello{spec.end_of_turn}" in rendered, rendered
    end = tokenizer.convert_tokens_to_ids(spec.end_of_turn)
    assert end != tokenizer.unk_token_id and end in tokenizer(rendered, add_special_tokens=False).input_ids
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    assert saved.get("chat_template") or (folder / "chat_template.jinja").is_file()
