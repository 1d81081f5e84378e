"""FSDP for QLoRA: one shard unit per decoder layer, and the one storage rule 4-bit weights must follow.

FSDP (Lightning's `FSDPStrategy`, FSDP1 with `use_orig_params=True`, its default) flattens each unit's
parameters into one buffer of a single dtype and shards it across ranks. The packed NF4 bytes are a
parameter like any other there, so they must be *stored* in the dtype of the LoRA weights and norms
(`quant.quant_storage: bfloat16`; the bytes are reinterpreted, never converted), and the layers must
find their quantization state without the parameter subclass that FSDP replaces by plain views
(`LoraLinear4bit` keeps it on the module). `configs/fsdp.yaml` sets all of this up.
"""

from __future__ import annotations

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .model import QuantSpec


def decoder_layer_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy: each decoder layer of any transformers model becomes its own shard unit.

    Per-layer units are what lets a rank hold only one layer's full weights at a time; transformers marks
    its decoder layers with `GradientCheckpointingLayer`, so no model class needs naming in the config.
    """
    return recurse or isinstance(module, GradientCheckpointingLayer)


def check_shardable(quant: QuantSpec) -> None:
    """Raise unless the packed 4-bit weights are stored in the compute dtype, as FSDP's flat buffers need."""
    if quant.quantize != "none" and quant.quant_storage != quant.compute_dtype:
        raise ValueError(
            f"FSDP shards each layer's parameters as one buffer of one dtype: set model.quant.quant_storage to "
            f"{quant.compute_dtype!r} (the compute dtype), not {quant.quant_storage!r} (see configs/fsdp.yaml)")
