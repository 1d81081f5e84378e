"""inject_lora: which linears get adapters, what the others become, on real and meta-device models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora_lightning.inject import inject_lora, matches_target
from qlora_lightning.lora import FrozenLinear4bit, lora_layers
from qlora_lightning.specs import LoraSpec, QuantSpec


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 16))


@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_inject_lora_replaces_linears_and_freezes_the_rest(quantize):
    model = nn.ModuleDict({"body": tiny_mlp(), "lm_head": nn.Linear(16, 8)})
    names = inject_lora(model, LoraSpec(r=4), QuantSpec(quantize=quantize))
    assert names == ["body.0", "body.2"]
    assert set(lora_layers(model)) == {"body.0", "body.2"}
    assert isinstance(model["lm_head"], nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"body.{i}.lora_{ab}" for i in (0, 2) for ab in "AB"}


def test_inject_lora_target_list_that_matches_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match="matches no linear layer of ModuleDict.*body.0"):
        inject_lora(nn.ModuleDict({"body": tiny_mlp()}), LoraSpec(target_modules=("q_proj",), exclude=()))


def test_target_matching_by_suffix_and_regex():
    assert matches_target("model.layers.0.self_attn.q_proj", LoraSpec(target_modules=("q_proj",)))
    assert not matches_target("model.layers.0.self_attn.qq_proj", LoraSpec(target_modules=("q_proj",)))
    assert matches_target("model.layers.3.mlp.up_proj", LoraSpec(target_modules=("re:.*layers\\.[0-3]\\.mlp\\..*",)))
    assert not matches_target("lm_head", LoraSpec(target_modules="all-linear", exclude=("lm_head",)))


def test_the_same_injector_builds_a_meta_skeleton_and_quantizes_the_non_targets():
    """On the meta device nothing is quantized yet (the loader gives the tensors later); every linear that is
    not a target becomes 4-bit, as the model card's load does."""
    with torch.device("meta"):
        model = nn.ModuleDict({"body": tiny_mlp()})
    names = inject_lora(model, LoraSpec(r=4, target_modules=("0",)), QuantSpec())
    assert names == ["body.0"] and isinstance(model["body"][2], FrozenLinear4bit)
    assert model["body"][0].lora_A.is_meta and model["body"][2].weight.is_meta
