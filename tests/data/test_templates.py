"""Prompt templates: the model card's default, Alpaca's, the tokenizer's chat template, and generation prompts."""

from __future__ import annotations

import pytest

from qlora_lightning.data.formats import Example
from qlora_lightning.data.templates import format_prompt, render_source

CARD = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.\n### Human: {question} ### Assistant:"
)


def test_qlora_template_is_the_model_cards_prompt():
    assert render_source(Example("What is 2 + 2?", "4"), "qlora") == CARD.format(question="What is 2 + 2?")
    assert render_source(Example("Hi", "x"), "guanaco") == CARD.format(question="Hi")


def test_system_prompt_replaces_the_default_sentence():
    assert (
        render_source(Example("Hi", "x", system="You are terse."), "qlora")
        == "You are terse.\n### Human: Hi ### Assistant:"
    )


def test_qlora_history_and_context():
    ex = Example("And 3+3?", "6", history=(("2+2?", "4"),))
    assert render_source(ex, "qlora").endswith("\n### Human: 2+2? ### Assistant: 4 ### Human: And 3+3? ### Assistant:")
    assert render_source(Example("Translate.", "x", context="Hallo"), "qlora").endswith(
        "### Human: Translate.\n\nHallo ### Assistant:"
    )


def test_alpaca_template_with_and_without_input():
    assert render_source(Example("Translate.", "Hello", context="Hallo"), "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nHallo\n\n### Response:"
    )
    assert render_source(Example("Say hi.", "Hi"), "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:"
    )


def test_chat_template_is_the_tokenizers_own(smollm2_tokenizer):
    ex = Example("What is 2 + 2?", "4", system="Be brief.", history=(("Hi", "Hello"),))
    expected = smollm2_tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert render_source(ex, "chat", smollm2_tokenizer) == expected
    assert expected.endswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    # without a system prompt the tokenizer's template decides (SmolLM2 inserts its own)
    assert "You are a helpful AI assistant named SmolLM" in render_source(Example("Hi", "x"), "chat", smollm2_tokenizer)


def test_chat_template_needs_a_tokenizer_with_one(bos_tokenizer):
    with pytest.raises(ValueError, match="needs a tokenizer that has a chat template"):
        render_source(Example("Hi", "x"), "chat", bos_tokenizer)


def test_format_prompt_matches_training_sources(smollm2_tokenizer):
    for template in ("qlora", "alpaca", "chat"):
        train = render_source(Example("What is 2 + 2?", "4", system="S"), template, smollm2_tokenizer)
        assert format_prompt("What is 2 + 2?", template, system="S", tokenizer=smollm2_tokenizer) == train
    assert format_prompt("Hi") == CARD.format(question="Hi")


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown template 'vicuna'; known templates: alpaca, chat, guanaco, qlora"):
        format_prompt("Hi", "vicuna")
