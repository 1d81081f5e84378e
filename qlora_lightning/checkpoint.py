"""Lightning checkpoint files: written atomically, each with a PEFT adapter folder beside it, read safely.

`AtomicCheckpointIO` is the trainer's checkpoint I/O plugin (`plugins=[AtomicCheckpointIO()]`; the CLI sets
it). A `.ckpt` holds the adapters plus optimizer, scheduler, loop, data-position and RNG state
(`QLoRAModule.on_save_checkpoint`); `step=100.ckpt` gets `step=100/`, a ready-to-use PEFT adapter folder
(`adapters.save_adapter`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .adapters import check_finite, save_adapter, to_peft_keys
from .atomic import write_file
from .resume import read_checkpoint

__all__ = ["AtomicCheckpointIO", "adapter_dir_for"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes `.ckpt` files atomically, a PEFT adapter folder beside each, and
    reads them back safely.

    The folder is written when the checkpoint carries `peft_adapter_config` (put there by
    `QLoRAModule.on_save_checkpoint`). The `.ckpt` is written first and each adapter file says its step in its
    metadata, so after a kill between the two the pair can be told apart. Adapters holding NaN or inf are never
    written. Loading always uses `weights_only=True` (`resume.read_checkpoint`): our checkpoints hold tensors
    and plain data only.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        adapter_config = checkpoint.get("peft_adapter_config")
        state = None
        if adapter_config is not None:
            state = to_peft_keys(checkpoint["state_dict"], prefix=checkpoint.get("peft_key_prefix", ""))
            check_finite(state, str(path))
        write_file(path, lambda tmp: torch.save(checkpoint, tmp))
        if state is not None:
            run = checkpoint.get("qlora_run") or {}
            save_adapter(
                adapter_dir_for(path),
                state,
                adapter_config,
                step=checkpoint.get("global_step"),
                base_fingerprint=run.get("base_fingerprint"),
            )

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location="cpu" if map_location is None else map_location)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        adapter_dir = adapter_dir_for(Path(path))
        if adapter_dir.is_dir():
            shutil.rmtree(adapter_dir)


def adapter_dir_for(ckpt_path: Path) -> Path:
    """The PEFT adapter folder written beside a `.ckpt` file (same name without the suffix)."""
    return ckpt_path.with_suffix("")
