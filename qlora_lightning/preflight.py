"""Settings refused before the model loads: runs that would train nothing, and precisions the layers cannot run.

`QLoRAModule.setup` calls these, so the command line and a plain `lightning.Trainer` get the same errors:
- `check_trains_something`: a learning rate of 0 or below, `max_steps` or `max_epochs` 0, `limit_train_batches` 0
  used to run, exit 0 and write a "final adapter" of an untrained (or, below 0, a worsened) model; a negative
  `gradient_clip_val` silently switched clipping off.
- `check_precision`: Lightning's `bf16-mixed` / `16-mixed` autocast the matmuls to one dtype while the LoRA layers
  compute in `quant.compute_dtype`; a pair that differs failed at the first step with a dtype error from deep in
  the layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from lightning.pytorch import Trainer

__all__ = ["SettingError", "check_trains_something", "check_precision"]

_AUTOCAST_DTYPES = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}
_TRUE_PRECISIONS = {"bfloat16": "bf16-true", "float16": "16-true", "float32": "32-true"}


class SettingError(ValueError):
    """A setting that cannot give a useful run; the message names the key and what to write instead. The command
    line prints it without a traceback."""


def check_trains_something(trainer: Trainer, optimizer_factory: Callable) -> None:
    """Raise `SettingError` naming every trainer or optimizer setting of `fit` that would train nothing."""
    problems = _loop_problems(trainer) + _learning_rate_problems(optimizer_factory)
    if problems:
        raise SettingError("; ".join(problems))


def _loop_problems(trainer: Trainer) -> list[str]:
    problems = []
    if trainer.max_steps == 0:
        problems.append(
            "trainer.max_steps is 0, a run that trains nothing: give the number of optimizer steps (-1: as many as "
            "max_epochs give)"
        )
    if trainer.max_epochs == 0:
        problems.append(
            "trainer.max_epochs is 0, a run that trains nothing: give at least 1 (-1: no limit, then set "
            "trainer.max_steps)"
        )
    if trainer.limit_train_batches == 0:
        problems.append(
            "trainer.limit_train_batches is 0, a run that trains nothing: leave it out to train on every batch"
        )
    clip = trainer.gradient_clip_val
    if clip is not None and not (math.isfinite(clip) and clip >= 0):
        problems.append(
            f"trainer.gradient_clip_val is {clip}: Lightning then clips nothing, silently. Give the largest "
            "gradient norm (the paper: 0.3), or 0 or null to switch clipping off"
        )
    return problems


def _learning_rate_problems(optimizer_factory: Callable) -> list[str]:
    """Build the optimizer for one probe parameter (optimizers check their arguments when built) and read its
    learning rates: cheap, and before the model loads."""
    key = "model.optimizer.init_args.lr (the optimizer's learning rate)"
    try:
        optimizer = optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    except ValueError as e:  # torch's and bitsandbytes' optimizers refuse a negative learning rate themselves
        return [f"{key}: the optimizer refuses its settings ({e}); the learning rate must be positive"]
    rates = {float(group["lr"]) for group in optimizer.param_groups}
    return [
        f"{key} is {rate:g}: it must be positive; 0 trains nothing and a negative rate climbs the loss"
        for rate in sorted(rates)
        if not (math.isfinite(rate) and rate > 0)
    ]


def check_precision(precision: str, compute_dtype: str) -> None:
    """Raise `SettingError` when `trainer.precision` autocasts to another dtype than `model.quant.compute_dtype`."""
    autocast = _AUTOCAST_DTYPES.get(str(precision))
    if autocast is not None and autocast != compute_dtype:
        raise SettingError(
            f"trainer.precision {precision!r} computes in {autocast} but model.quant.compute_dtype is "
            f"{compute_dtype!r}, and the LoRA layers compute in one dtype: set --model.quant.compute_dtype "
            f"{autocast}, or use --trainer.precision {_TRUE_PRECISIONS[compute_dtype]} for {compute_dtype}"
        )
