"""qlora-lightning: QLoRA instruction tuning (NF4 base + LoRA) as a PyTorch Lightning toolkit."""

import os

# bitsandbytes' CPU kernels use the system OpenMP runtime and torch its own; with both spinning after
# each parallel region, 2 CPU cores spend most of a training step waiting (seen here: 60-80 s vs 13 s a
# SmolLM2 step). Passive waiting must be chosen before torch loads; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .checkpoint import AtomicCheckpointIO, export_adapter, load_adapter_into  # noqa: E402
from .data import InstructionDataModule  # noqa: E402
from .fsdp import QLoRAFSDPStrategy  # noqa: E402
from .lora import LoraLinear4bit, LoraLinear16bit, inject_lora  # noqa: E402
from .model import LoraSpec, QuantSpec, load_model  # noqa: E402
from .module import QLoRAModule  # noqa: E402

__all__ = ["QLoRAModule", "InstructionDataModule", "LoraLinear4bit", "LoraLinear16bit", "inject_lora",
           "load_model", "LoraSpec", "QuantSpec", "AtomicCheckpointIO", "export_adapter", "load_adapter_into",
           "QLoRAFSDPStrategy"]
