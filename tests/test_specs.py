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
