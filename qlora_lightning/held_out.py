"""The held-out loss: the mean loss over the labelled tokens of a loader, whatever the model's dtype.

Each batch gives its mean loss over its labelled tokens and their count (`QLoRAModule.loss_on`); the held-out
loss weighs each batch by that count and sums in float64, so a bf16 model's hundred batches add up to the same
number as a float32 one's (a bf16 sum is off by percents, and its counts lose integers past 256). The demo's
report measures with `held_out_loss`; a loop that is driven one batch at a time (a validation step) keeps a
`LabelledLossSum` itself, and `log_held_out` logs its mean over every rank's tokens at the epoch's end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

__all__ = ["LossOn", "LabelledLossSum", "held_out_loss", "log_held_out"]

#: batch → (mean loss over its labelled tokens, their count): `QLoRAModule.loss_on`, or a wrapper that relabels.
LossOn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


class LabelledLossSum:
    """A running sum of batches' losses weighted by their labelled tokens, kept in float64 on the batches' device
    (no host synchronization per batch); `sums()` is what ranks add up, `mean()` the held-out loss."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, count: torch.Tensor) -> None:
        """Add one batch: its mean loss over labelled tokens and their count."""
        weighted, count = loss.detach().double() * count.double(), count.detach().double()
        self.total = weighted if self.total is None else self.total + weighted
        self.count = count if self.count is None else self.count + count

    def sums(self) -> torch.Tensor:
        """[weighted loss sum, labelled tokens] (float64): sum these over ranks, then divide."""
        if self.total is None or self.count is None:  # set together by `add`
            return torch.zeros(2, dtype=torch.float64)
        return torch.stack([self.total, self.count])

    def mean(self) -> float:
        """The mean loss over every labelled token added (0 when none was)."""
        total, count = self.sums().tolist()
        return total / max(count, 1)


@torch.no_grad()
def held_out_loss(loss_on: LossOn, batches: Iterable[dict], device: torch.device | str) -> float:
    """The mean loss over the labelled tokens of `batches` (each moved to `device`), summed in float64.

    `loss_on` is the module's `loss_on`, or a wrapper of it that changes the labels (a fidelity bench scoring the
    answer's first token alone). The caller puts the model in eval mode: the demo wants it so for generation too.
    """
    sums = LabelledLossSum()
    for batch in batches:
        sums.add(*loss_on(move_data_to_device(batch, device)))
    return sums.mean()


def log_held_out(module: LightningModule, split: str, sums: LabelledLossSum) -> None:
    """Log `<split>/loss` (the mean over every rank's labelled tokens: the ranks' `sums` are added first, so a rank
    with more tokens weighs more) and `<split>/perplexity` from `module` (in its validation or test epoch end)."""
    totals = sums.sums().to(module.device)
    if module.trainer.world_size > 1:
        totals = module.trainer.strategy.reduce(totals, reduce_op="sum")
    loss = totals[0] / totals[1].clamp(min=1)
    module.log(f"{split}/loss", loss.float(), prog_bar=split == "val", sync_dist=False)
    module.log(f"{split}/perplexity", torch.exp(loss).float(), sync_dist=False)
