"""QuantSpec / LoraSpec: the recipe's defaults, and values that would train nothing or garbage refused."""

from __future__ import annotations

import pytest

from qlora_lightning.specs import LoraSpec, QuantSpec, torch_dtype


def test_defaults_are_the_papers_recipe():
    assert (LoraSpec().r, LoraSpec().alpha, LoraSpec().dropout, LoraSpec().target_modules) == (
        64,
        16,
        0.1,
        "all-linear",
    )
    assert (QuantSpec().quantize, QuantSpec().double_quant, QuantSpec().compute_dtype) == ("nf4", True, "bfloat16")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "lora.r must be a positive integer"),
        (dict(alpha=0), "lora.alpha must be a positive number"),  # trains nothing: every lora_B gradient is zero
        (dict(alpha=-16), "lora.alpha must be a positive number"),
        (dict(dropout=1.0), "lora.dropout must be in"),
        (dict(target_modules=()), "lora.target_modules is empty"),
    ],
)
def test_lora_values_that_train_nothing_or_garbage_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraSpec(**kwargs)


def test_quant_values_outside_the_choices_are_refused():
    with pytest.raises(ValueError, match="quant.quantize must be one of nf4, fp4, none; got 'int4'"):
        QuantSpec(quantize="int4")
    with pytest.raises(ValueError, match="quant.compute_dtype"):
        QuantSpec(compute_dtype="float8")
    with pytest.raises(ValueError, match="unknown dtype 'bf16'"):
        torch_dtype("bf16")


def test_a_torch_dtype_is_taken_as_its_name():
    """`QuantSpec(compute_dtype=torch.float32)` was refused with "must be one of bfloat16, float16, float32; got
    torch.float32": users pass a torch.dtype as often as its name."""
    import torch

    spec = QuantSpec(compute_dtype=torch.float32, quant_storage=torch.bfloat16)
    assert spec == QuantSpec(compute_dtype="float32", quant_storage="bfloat16")
    assert torch_dtype(spec.compute_dtype) is torch.float32
    with pytest.raises(ValueError, match="quant.compute_dtype must be one of bfloat16, float16, float32; got 'int8'"):
        QuantSpec(compute_dtype=torch.int8)


@pytest.mark.parametrize(
    "kwargs, key, pattern",
    [
        (dict(target_modules="re:("), "lora.target_modules", "re:("),
        (dict(target_modules=("q_proj", "re:[a-")), "lora.target_modules", "re:[a-"),
        (dict(exclude=("lm_head", "re:)")), "lora.exclude", "re:)"),
    ],
)
def test_a_target_regex_that_does_not_compile_names_the_key_and_the_pattern(kwargs, key, pattern):
    """`target_modules 're:('` used to surface later as a bare `re.error` from the matcher."""
    import re

    with pytest.raises(ValueError, match=f"{key}: {re.escape(repr(pattern))} is not a valid regular expression"):
        LoraSpec(**kwargs)
