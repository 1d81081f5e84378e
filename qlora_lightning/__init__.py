"""qlora-lightning: QLoRA instruction tuning (NF4 base + LoRA) as a PyTorch Lightning toolkit.

The names below are imported on first use, so that `import qlora_lightning.data` (or any one module) loads
only what that module needs: the data pipeline, for instance, never imports bitsandbytes. Importing the
package changes one process-wide thing, for every entry (the CLI, a plain `Trainer`, the benchmarks) alike: the
`kernels` package is hidden, since bitsandbytes and transformers would otherwise fetch and run code from the hub
unasked (`hub_kernels.py`). Other process settings are the entry points' (`qlora_lightning.cli`, `train.py`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from .hub_kernels import keep_hub_kernels_out

keep_hub_kernels_out()

_EXPORTS = {
    "QLoRAModule": "module",
    "InstructionDataModule": "data.datamodule",
    "LoraLinear4bit": "lora",
    "LoraLinear16bit": "lora",
    "inject_lora": "inject",
    "load_model": "model",
    "LoraSpec": "specs",
    "QuantSpec": "specs",
    "AtomicCheckpointIO": "checkpoint",
    "export_adapter": "adapters",
    "read_adapter": "adapters",
    "QLoRAFSDPStrategy": "fsdp",
    "QLoRAFSDP2Strategy": "fsdp2",
    "ResumableCheckpoint": "resume",
    "find_last_checkpoint": "resume",
}

__all__ = sorted(_EXPORTS)


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, whose names (`exports`: name → module) are imported from their
    modules on first use and kept."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted([*vars(sys.modules[package]), *exports])

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
