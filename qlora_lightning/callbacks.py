"""The training callbacks: what a QLoRA run logs and guards besides its steps.

Logging (the CLI adds these to every trainer; research code's own `lightning.Trainer` lists `training_monitors()`):
- `train/lr`: Lightning's own `LearningRateMonitor`, reading the scheduler's name (`QLoRAModule` names it
  `train/lr`): the rate each optimizer step used.
- `train/tokens_per_s`: `TokensPerSecond`. Lightning's `ThroughputMonitor` falls short here: it reports only
  once a window of batches (100 by default) has passed, so short runs log nothing, and it counts padded
  positions unless given a length function; this one logs every step's non-padding tokens over all ranks.
- `train/peak_mem_gib` (GPU) or `train/peak_host_mem_gib` (CPU): `PeakMemory`. Lightning's `DeviceStatsMonitor`
  logs every field of `torch.cuda.memory_stats` (hundreds) on a GPU and needs psutil for the CPU, where it logs
  the current use, not the peak that decides whether a run fits.

Guards (`QLoRAModule.configure_callbacks` adds these to every trainer, the CLI's and a plain one alike):
- `NonFiniteGuard`: the first NaN/inf loss or gradient stops training before the optimizer step, all ranks
  agreeing. Its state lives between two optimizer steps only, so it saves nothing in checkpoints.
- `TrainingRngStream`: the training RNG stream (LoRA dropout) kept apart from what runs between batches, and
  saved in checkpoints, so a resumed run draws exactly the same masks.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor

from .fsdp2 import local_gradients
from .optim import PagedAdamW32bitOneSync

__all__ = ["NonFiniteGuard", "PeakMemory", "TokensPerSecond", "TrainingRngStream", "training_monitors"]


def training_monitors(with_logger: bool = True) -> list[Callback]:
    """The logging callbacks of a run: learning rate (only `with_logger`: Lightning's `LearningRateMonitor`
    refuses a trainer without one), tokens per second and peak memory."""
    monitors: list[Callback] = [TokensPerSecond(), PeakMemory()]
    return [LearningRateMonitor(logging_interval="step"), *monitors] if with_logger else monitors


class TokensPerSecond(Callback):
    """Logs `train/tokens_per_s`: the non-padding tokens of each training batch, over all ranks, per second of
    that batch's step (forward, backward and, on the last micro-batch, the optimizer)."""

    def __init__(self) -> None:
        self._start: float | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self._start is not None, "on_train_batch_start sets it"
        elapsed = time.perf_counter() - self._start
        mask = batch.get("attention_mask")
        tokens = (mask.sum().item() if mask is not None else batch["input_ids"].numel()) * trainer.world_size
        pl_module.log("train/tokens_per_s", tokens / max(elapsed, 1e-9), prog_bar=True, on_step=True, batch_size=1)


class PeakMemory(Callback):
    """Logs the peak memory so far after each training batch: `train/peak_mem_gib` (the GPU's allocated peak) or,
    on the CPU, `train/peak_host_mem_gib` (the process's peak resident set)."""

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        device = pl_module.device
        if device.type == "cuda":
            name, gib = "train/peak_mem_gib", torch.cuda.max_memory_allocated(device) / 2**30
        else:  # ru_maxrss is in KiB on Linux
            name, gib = "train/peak_host_mem_gib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        pl_module.log(name, gib, on_step=True, batch_size=1)


class NonFiniteGuard(Callback):
    """Stops with a clear error when a loss or gradient is NaN or inf, before the optimizer makes every adapter
    NaN: nothing of that step is applied or saved. All ranks take the same decision (one all-reduce of a flag),
    so none is left waiting."""

    def __init__(self) -> None:
        self._loss_finite: torch.Tensor | None = None  # every micro-batch's loss finite since the last step
        self._last_loss: torch.Tensor | None = None

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach() * trainer.accumulate_grad_batches  # Lightning divided it by the accumulation
        finite = torch.isfinite(loss)
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self._last_loss = loss

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Decide on the device, then read the decision (a wait for the device) where the optimizer is about to
        update: `PagedAdamW32bitOneSync.check_before_update` runs it after preparing its update, so the device is not
        left idle meanwhile; with any other optimizer, or a gradient scaler, now."""
        grads = local_gradients(pl_module)  # under FSDP2, this rank's shards
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=pl_module.device)
        bad = (~torch.isfinite(norm)) | (~self._loss_finite if self._loss_finite is not None else False)
        self._loss_finite = None
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad.float(), reduce_op="sum") > 0
        last_loss, step = self._last_loss, trainer.global_step + 1

        def check() -> None:
            if bool(bad):
                loss = float(last_loss) if last_loss is not None else float("nan")
                raise FloatingPointError(
                    f"training stopped at step {step}: the loss ({loss:.4g} on this rank) or the gradient norm "
                    f"({float(norm):.4g}) is not finite. Nothing of this step was applied or saved; the last "
                    "checkpoint is intact. Usual causes: a learning rate too high for this model, float16 overflow "
                    "(use bf16), or NaN in the data or a starting adapter"
                )

        # Not under float16's gradient scaler, which skips the optimizer's step (and with it the check) on overflow.
        if isinstance(optimizer, PagedAdamW32bitOneSync) and getattr(trainer.precision_plugin, "scaler", None) is None:
            optimizer.check_before_update(check)
        else:
            check()


class TrainingRngStream(Callback):
    """The training RNG stream (LoRA dropout), kept apart from everything that runs between batches (validation,
    data loader start-up): its state after each training forward is taken and restored before the next batch,
    and saved in checkpoints (`state_dict`), so a resumed run draws exactly the same masks. Backward and the
    optimizer draw no random numbers (checkpointing's recomputation replays the forward's state)."""

    #: where checkpoints written before this callback existed keep the stream's state
    EARLIER_KEY = "rng_state"

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None
        self._device = torch.device("cpu")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._device = trainer.strategy.root_device

    def _current(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state(self._device) if self._device.type == "cuda" else None
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._state is None:
            return
        torch.set_rng_state(self._state["cpu"])
        if self._state.get("cuda") is not None and self._device.type == "cuda":
            torch.cuda.set_rng_state(self._state["cuda"], self._device)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._state = self._current()

    def state_dict(self) -> dict[str, Any]:
        """The stream's state for a checkpoint: after the last training forward, or now when none has run."""
        return self._state if self._state is not None else self._current()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the stream at the checkpoint's state: the next training batch starts from it."""
        self._state = state_dict

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """A checkpoint from before this callback keeps the state at its top level; `load_state_dict` then takes
        it (Lightning calls this hook first, and `load_state_dict` only for checkpoints that hold the callback)."""
        if self.EARLIER_KEY in checkpoint:
            self._state = checkpoint[self.EARLIER_KEY]
