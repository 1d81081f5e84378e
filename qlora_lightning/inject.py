"""Putting QLoRA layers into a model: which linear layers get adapters (one matcher), and what replaces them.

`inject_lora(model, lora, quant)` replaces every `nn.Linear` but the output head, as the model card's 4-bit load
does: a LoRA target (`matches_target`) becomes a `LoraLinear4bit` (`LoraLinear16bit` with `quant.quantize ==
"none"`), any other linear a frozen `FrozenLinear4bit` (left alone with "none"). A linear on the meta device
becomes a layer on the meta device, to be given its tensors later (`model.ModuleMaterializer`: that is how
`model.load_model` loads a checkpoint without ever holding it whole); a real one is quantized from its own
weight. Every other parameter is frozen.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .lora import FrozenLinear, FrozenLinear4bit, LoraLinear, LoraLinear4bit, LoraLinear16bit
from .specs import LoraSpec, QuantSpec

__all__ = ["matches_target", "inject_lora"]


def matches_target(name: str, lora: LoraSpec) -> bool:
    """Whether the module called `name` gets an adapter under `lora`.

    `lora.target_modules` is "all-linear" (the paper: every linear layer) or module-name suffixes such as
    ("q_proj", "v_proj") (a suffix matches a whole dotted component) or regexes ("re:..."); `lora.exclude`
    names suffixes never adapted (the output head, as QLoRA).
    """

    def hit(pattern: str) -> bool:
        if pattern.startswith("re:"):
            return re.fullmatch(pattern[3:], name) is not None
        return name == pattern or name.endswith("." + pattern)

    if any(hit(p) for p in lora.exclude):
        return False
    if lora.target_modules == "all-linear":
        return True
    targets = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
    return any(hit(p) for p in targets)


def inject_lora(
    model: nn.Module,
    lora: LoraSpec | None = LoraSpec(),
    quant: QuantSpec = QuantSpec(),
    *,
    device: torch.device | str | None = None,
) -> list[str]:
    """Replace the linears of `model` by QLoRA layers (see the module docstring) and freeze all the rest.

    `lora` None puts in no adapters (the quantized base alone, for evaluating it). `device` is where layers
    built from real weights are quantized (default: each weight's own). Returns the LoRA layers' names; raises
    `ValueError` naming the model's linear layers when the targets match none.
    """
    output_embeddings = getattr(model, "get_output_embeddings", None)  # a transformers model's; None on others
    head = output_embeddings() if output_embeddings is not None else None
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, FrozenLinear)}
    targets = sorted(n for n in linears if lora is not None and matches_target(n, lora))
    if lora is not None and not targets:
        raise ValueError(
            f"lora.target_modules={lora.target_modules!r} (exclude={lora.exclude!r}) matches no linear "
            f"layer of {type(model).__name__}; its linear layers include {sorted(linears)[:8]}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    layer_cls = LoraLinear16bit if quant.quantize == "none" else LoraLinear4bit
    for name, linear in linears.items():
        bias = linear.bias is not None
        layer: LoraLinear | FrozenLinear4bit
        if name in targets:
            layer = layer_cls(linear.in_features, linear.out_features, bias, lora=lora, quant=quant, device="meta")
        elif quant.quantize != "none" and linear is not head:
            layer = FrozenLinear4bit.empty(linear.in_features, linear.out_features, bias=bias, quant=quant)
        else:
            continue
        if not linear.weight.is_meta:
            _give_weights(layer, linear, torch.device(device) if device is not None else linear.weight.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    return targets


def _give_weights(layer: LoraLinear | FrozenLinear4bit, linear: nn.Linear, device: torch.device) -> None:
    """A meta-device QLoRA layer made real from the linear it replaces: base quantized, fresh adapters."""
    base = layer.base_layer if isinstance(layer, LoraLinear) else layer
    base.load_dense(linear.weight, linear.bias, device)
    if isinstance(layer, LoraLinear):
        layer.materialize_lora(device)
