"""held_out_loss: the mean loss over a loader's labelled tokens, each batch weighted by its count, summed in float64."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from qlora_lightning.held_out import LabelledLossSum, held_out_loss


def test_the_held_out_loss_weighs_batches_by_their_labelled_tokens_in_float64():
    """A bf16 model's losses and counts (300 batches of up to 1,000 labelled tokens) add up exactly as numbers do: a
    bf16 running sum is off by percents and loses integers past 256."""
    losses = [torch.tensor(1 + i % 7 / 8, dtype=torch.bfloat16) for i in range(300)]
    counts = [torch.tensor(1 + (i * 37) % 1000) for i in range(300)]
    batches = [{"labels": torch.full((1, 2), i)} for i in range(300)]
    seen = []

    def loss_on(batch):
        seen.append(batch["labels"].device)
        i = int(batch["labels"][0, 0])
        return losses[i], counts[i]

    exact = sum(Fraction(float(loss)) * int(n) for loss, n in zip(losses, counts, strict=True)) / sum(
        int(n) for n in counts
    )
    assert held_out_loss(loss_on, batches, "cpu") == pytest.approx(float(exact), rel=1e-15)
    assert len(seen) == 300 and all(d.type == "cpu" for d in seen)
    in_bf16 = sum(
        (loss * n.to(torch.bfloat16) for loss, n in zip(losses, counts, strict=True)),
        torch.tensor(0.0, dtype=torch.bfloat16),
    )
    assert abs(float(in_bf16) / sum(int(n) for n in counts) - float(exact)) > 0.01  # what float64 avoids


def test_an_empty_loader_is_a_loss_of_zero_not_a_division_by_zero():
    assert held_out_loss(lambda batch: pytest.fail("no batch to score"), [], "cpu") == 0.0
    sums = LabelledLossSum()
    assert sums.mean() == 0.0 and sums.sums().tolist() == [0.0, 0.0]
    sums.add(torch.tensor(2.0), torch.tensor(3))
    sums.add(torch.tensor(4.0), torch.tensor(1))
    assert sums.sums().tolist() == [10.0, 4.0] and sums.mean() == 2.5
