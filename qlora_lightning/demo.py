"""`DemoReport`: what a fine-tuning run changed, measured on held-out examples before and after `fit` (a resumed run:
at the step it resumed from and after, each column named by its step).

The CPU demo (`configs/demo.yaml`) trains SmolLM2-135M on the bundled OpenOrca-format sample, whose
answers can be checked; this callback prints the held-out loss and exact-match accuracy before and
after training and one generated answer, and writes them to `<log dir>/demo_report.json` (atomically). The
held-out loss is `held_out.held_out_loss`: the loss over the answers' tokens, summed in float64.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from .atomic import write_text
from .data.formats import format_record
from .data.sample import exact_match
from .data.sources import resolve_bundled
from .data.templates import format_prompt
from .generate import generate
from .held_out import held_out_loss


class DemoReport(Callback):
    """Held-out loss and exact match before and after training, plus one generated answer.

    Args:
        examples: held-out records to generate answers for (exact match); the first ones of the
            validation file, so before and after see the same questions.
        max_new_tokens: answers of the bundled tasks are a few tokens; 16 leaves room.
        template: must be the data module's template, so prompts look like training's.
        batch_size: prompts generated at once (left-padded). 8 suits the CPU demo; hundreds of examples on a GPU
            want 64 or more, where a batch of 8 makes generation, not training, the run's longest part.
    """

    def __init__(
        self, examples: int = 60, max_new_tokens: int = 16, template: str = "qlora", batch_size: int = 8
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"DemoReport batch_size must be at least 1, got {batch_size}")
        self.examples, self.max_new_tokens, self.template = examples, max_new_tokens, template
        self.batch_size = batch_size
        self.before: dict | None = None

    def _held_out(self, trainer: Trainer) -> list:
        """The first `examples` records of the validation file (bundled name or local .jsonl)."""
        data = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector, undeclared
        name = data.hparams.val_dataset
        if not name:
            raise ValueError("DemoReport needs data.val_dataset (a bundled name or a .jsonl file)")
        path = resolve_bundled(name) if name.startswith("bundled:") else Path(name)
        lines = [line for line in path.read_text().splitlines() if line.strip()][: self.examples]
        return [format_record(json.loads(line), data.hparams.format)[0] for line in lines]

    @torch.no_grad()
    def _measure(self, trainer: Trainer, module: LightningModule) -> dict:
        qlora: Any = module  # a QLoRAModule (module.py sits above this file): `model`, `tokenizer`, `loss_on`
        model, tokenizer = qlora.model, qlora.tokenizer
        was_training = model.training
        model.eval()
        data = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector, undeclared
        loss = held_out_loss(qlora.loss_on, data.val_dataloader(), module.device)
        examples = self._held_out(trainer)
        prompts = [
            format_prompt(e.prompt, self.template, system=e.system, context=e.context, tokenizer=tokenizer)
            for e in examples
        ]
        answers = generate(
            model, tokenizer, prompts, template=None, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size
        )
        model.train(was_training)
        hits = [exact_match(a, e.response) for a, e in zip(answers, examples, strict=True)]
        return {
            "loss": loss,
            "exact_match": sum(hits) / len(hits),
            "n": len(hits),
            "question": examples[0].prompt,
            "reference": examples[0].response,
            "answer": answers[0],
        }

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and self.before is None:
            self.before = self._measure(trainer, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A resumed run's adapters are restored before `on_fit_start` (measured there), its step count only after:
        # the step they were measured at is known here (0 for a new run).
        if self.before is not None:
            self.before.setdefault("step", trainer.global_step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero or self.before is None:
            return
        after = {"step": trainer.global_step, **self._measure(trainer, pl_module)}
        b = self.before
        b.setdefault("step", after["step"])  # no training started (a finished run fitted again): nothing changed
        # A resumed run starts from its checkpoint's adapters, not the base model's: its columns say their steps.
        first, last = ("before", "after") if b["step"] == 0 else (f"step {b['step']}", f"step {after['step']}")
        print(f"\n{'held-out (bundled sample)':<30}{first:>10}{last:>10}")
        print(f"{'loss on answers':<30}{b['loss']:>10.3f}{after['loss']:>10.3f}")
        print(
            f"{'exact match (' + str(b['n']) + ' questions)':<30}{b['exact_match']:>10.1%}{after['exact_match']:>10.1%}"
        )
        print(
            f"\nQ: {after['question']}\nreference: {after['reference']}\n"
            f"{first + ':':<11}{b['answer']!r}\n{last + ':':<11}{after['answer']!r}\n"
        )
        write_text(Path(log_dir) / "demo_report.json", json.dumps({"before": b, "after": after}, indent=2) + "\n")
