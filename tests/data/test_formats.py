"""Record formats: each layout's fields, the checks on them, and the registry."""

from __future__ import annotations

import re

import pytest

from qlora_lightning.data.formats import FORMATS, Example, RecordError, format_record, register_format


def test_openorca_reads_system_question_response():
    rec = {"id": "x", "system_prompt": " Be brief. ", "question": "What is 2 + 2?", "response": "4"}
    assert format_record(rec, "openorca") == [Example(prompt="What is 2 + 2?", response="4", system="Be brief.")]
    for empty_system in ({"system_prompt": ""}, {"system_prompt": None}, {}):
        (ex,) = format_record({"question": "q", "response": "r", **empty_system}, "openorca")
        assert ex.system == ""


def test_alpaca_with_and_without_input():
    (ex,) = format_record({"instruction": "Translate.", "input": "Hallo", "output": "Hello"}, "alpaca")
    assert (ex.prompt, ex.context, ex.response) == ("Translate.", "Hallo", "Hello")
    (ex,) = format_record({"instruction": "Say hi.", "input": "", "output": "Hi"}, "alpaca")
    assert ex.context == ""


def test_input_output():
    assert format_record({"input": "ping", "output": "pong"}, "input_output") == [
        Example(prompt="ping", response="pong")
    ]


def test_oasst1_gives_one_example_per_assistant_turn_with_the_conversation_before_it():
    text = "### Human: Hi there ### Assistant: Hello! ### Human: What is 2+2?### Assistant: 4"
    first, second = format_record({"text": text}, "oasst1")
    assert first == Example(prompt="Hi there", response="Hello!")
    assert second == Example(prompt="What is 2+2?", response="4", history=(("Hi there", "Hello!"),))


@pytest.mark.parametrize(
    "text, problem",
    [
        ("Hello ### Human: hi ### Assistant: yo", "must start with '### Human:'"),
        ("### Human: hi", "no '### Assistant:' turn"),
        ("### Human: hi ### Human: again ### Assistant: yo", "turn 2 is '### Human:'"),
        ("### Human: hi ### Assistant:   ", "turn 2 ('### Assistant:') is empty"),
        ("just text", "must start with"),
    ],
)
def test_oasst1_rejects_malformed_conversations(text, problem):
    with pytest.raises(RecordError, match=re.escape(problem)) as err:
        format_record({"text": text}, "oasst1")
    assert err.value.field == "text"


@pytest.mark.parametrize(
    "record, field, problem",
    [
        ({"response": "4"}, "question", "missing"),
        ({"question": None, "response": "4"}, "question", "is null"),
        ({"question": "q", "response": 4}, "response", "must be a string, got int"),
        ({"question": "q", "response": "  "}, "response", "is empty"),
        ({"question": "q", "response": "r", "system_prompt": ["x"]}, "system_prompt", "must be a string, got list"),
        ({"question": "caf\ud800?", "response": "r"}, "question", r"is not valid text: lone surrogate '\\ud800'"),
    ],
)
def test_bad_fields_name_the_field(record, field, problem):
    with pytest.raises(RecordError, match=problem) as err:
        format_record(record, "openorca")
    assert err.value.field == field and f"field {field!r}" in str(err.value)


def test_a_record_must_be_an_object():
    with pytest.raises(RecordError, match="expected a JSON object.*got list"):
        format_record(["q", "r"], "openorca")


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown format 'orca'; known formats: alpaca, input_output, oasst1, openorca"
    ):
        format_record({}, "orca")


def test_a_new_format_is_one_decorated_function():
    @register_format("qa_test")
    def qa(record):
        return [Example(prompt=record["q"], response=record["a"])]

    try:
        assert format_record({"q": "1+1", "a": "2"}, "qa_test") == [Example(prompt="1+1", response="2")]
        with pytest.raises(ValueError, match="already registered"):
            register_format("qa_test")(qa)
    finally:
        del FORMATS["qa_test"]
