"""Lightning checkpoint files: written atomically, each with a PEFT adapter folder beside it, read safely.

`AtomicCheckpointIO` is the trainer's checkpoint I/O plugin (`plugins=[AtomicCheckpointIO()]`; the CLI sets
it). A `.ckpt` holds the adapters plus optimizer, scheduler, loop, data-position and RNG state
(`QLoRAModule.on_save_checkpoint`); `step=100.ckpt` gets `step=100/`, a ready-to-use PEFT adapter folder
(`adapters.save_adapter`). A kill between the two writes leaves the folder a step behind its `.ckpt` (or
missing): `repair_adapter_folders`, run when a run starts in that checkpoint folder, rewrites it from the `.ckpt`.
At the end of a `fit` the run's adapters go to `<log dir>/adapter/` (`save_final_adapter`), and a trainer without
this plugin is warned at its start (`warn_unless_atomic`); `QLoRAModule.on_fit_end` / `on_fit_start` call these.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from safetensors import safe_open

from .adapters import ADAPTER_WEIGHTS, STEP_KEY, check_finite, save_adapter, to_peft_keys
from .atomic import write_file
from .resume import MODEL_PREFIX, CheckpointError, read_checkpoint

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = [
    "AtomicCheckpointIO",
    "adapter_dir_for",
    "repair_adapter_folders",
    "save_final_adapter",
    "warn_unless_atomic",
]


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
        state = _peft_state(checkpoint)
        if state is not None:
            check_finite(state, str(path))
        write_file(path, lambda tmp: torch.save(checkpoint, tmp))
        if state is not None:
            _write_adapter_folder(checkpoint, state, adapter_dir_for(path))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location="cpu" if map_location is None else map_location)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        adapter_dir = adapter_dir_for(Path(path))
        if adapter_dir.is_dir():
            shutil.rmtree(adapter_dir)

    def repair_adapter_folders(self, checkpoint_dir: str | os.PathLike) -> list[str]:
        """`repair_adapter_folders` for the folders this I/O writes; `resume.ResumableCheckpoint` calls it as a run
        starts in `checkpoint_dir` (through the trainer's checkpoint I/O, so resume.py imports nothing above it)."""
        return repair_adapter_folders(checkpoint_dir)


def adapter_dir_for(ckpt_path: Path) -> Path:
    """The PEFT adapter folder written beside a `.ckpt` file (same name without the suffix)."""
    return ckpt_path.with_suffix("")


def _peft_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The checkpoint's adapters under PEFT's keys; None for a checkpoint without `peft_adapter_config` (not
    written by `QLoRAModule`)."""
    if checkpoint.get("peft_adapter_config") is None:
        return None
    return to_peft_keys(checkpoint["state_dict"], prefix=checkpoint.get("peft_key_prefix", ""))


def _write_adapter_folder(checkpoint: dict[str, Any], state: dict[str, torch.Tensor], folder: Path) -> None:
    run = checkpoint.get("qlora_run") or {}
    save_adapter(
        folder,
        state,
        checkpoint["peft_adapter_config"],
        step=checkpoint.get("global_step"),
        base_fingerprint=run.get("base_fingerprint"),
    )


def _folder_step(folder: Path) -> str | None:
    """The step an adapter folder says it holds; None when it is missing, damaged or says none."""
    try:
        with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
            return (f.metadata() or {}).get(STEP_KEY)
    except Exception:  # missing or damaged: safetensors raises several types, none naming the file
        return None


def repair_adapter_folders(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Rewrite from its `.ckpt` every adapter folder of `checkpoint_dir` that is missing or holds another step
    (a kill between the two writes of a save); return a line for each. A `.ckpt` that cannot be read is left to
    the resume that would use it (which names it)."""
    notes = []
    for ckpt_path in sorted(Path(checkpoint_dir).glob("*.ckpt")):
        try:
            checkpoint = read_checkpoint(ckpt_path, mmap=True)
        except CheckpointError:
            continue
        state, folder = _peft_state(checkpoint), adapter_dir_for(ckpt_path)
        step = checkpoint.get("global_step")
        if state is None or _folder_step(folder) == str(step):
            continue
        _write_adapter_folder(checkpoint, state, folder)
        notes.append(f"{folder}: rewritten from {ckpt_path.name} (step {step}); a save there had been interrupted")
    return notes


def warn_unless_atomic(trainer: Trainer) -> None:
    """Warn when `trainer` saves through another checkpoint I/O than `AtomicCheckpointIO` (a research script's plain
    `Trainer` without `plugins=[AtomicCheckpointIO()]`): its saves are not atomic and write no PEFT folders."""
    if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
        warnings.warn(
            "the trainer's checkpoint_io is not qlora_lightning.AtomicCheckpointIO: saves are not "
            "atomic and no PEFT adapter folder is written beside each checkpoint; pass "
            "plugins=[AtomicCheckpointIO()] to the Trainer",
            stacklevel=1,
        )


def save_final_adapter(trainer: Trainer, config: dict[str, Any], base_fingerprint: str | None) -> Path:
    """Write the run's adapters as a PEFT folder `<log dir>/adapter` (on global rank 0), and say where; `config` is
    the module's `adapter_config()`. Every rank calls it: the strategy's state dict is a collective (under FSDP
    the sharded adapters are gathered on rank 0), and so is the trainer's `log_dir`."""
    folder = Path(trainer.log_dir or trainer.default_root_dir) / "adapter"
    state = trainer.strategy.lightning_module_state_dict()
    if trainer.is_global_zero:
        peft_state = to_peft_keys(state, prefix=MODEL_PREFIX)
        save_adapter(folder, peft_state, config, step=trainer.global_step, base_fingerprint=base_fingerprint)
        print(f"final adapter written to {folder}")
    return folder
