"""What a trained model is measured by besides its eval loss: MMLU 5-shot (all subjects, and either half of the
split) and the held-out loss on the answer's letter alone."""

from __future__ import annotations

import contextlib
from pathlib import Path


def evaluate(base: str, adapter: str | None, quant, spec: dict, output: Path, log: Path) -> dict:
    """`evaluate_mmlu` on all 57 subjects (or the first N of each, `mmlu_eval.max_questions_per_subject`), its
    per-subject lines sent to `log`; the JSON goes to `output`."""
    from qlora_lightning.eval.mmlu import evaluate_mmlu

    settings = spec["mmlu_eval"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f):
        results = evaluate_mmlu(
            base=base,
            adapter=adapter,
            data=spec["mmlu"],
            shots=settings.get("shots", 5),
            max_questions_per_subject=settings.get("max_questions_per_subject"),
            batch_size=settings.get("batch_size", 64),
            max_length=settings.get("max_length", 2048),
            quant=quant,
            output=str(output),
            progress=False,
            allow_other_base=False,
        )
    print(
        f"  MMLU {results['shots']}-shot, {results['questions']} questions: mean over subjects "
        f"{results['accuracy_mean_over_subjects']:.4f} ({results['seconds']:.0f} s) -> {output.name}",
        flush=True,
    )
    return results


def half_accuracy(results: dict, subjects: list[str]) -> dict:
    """Accuracy on `subjects` from a per-subject MMLU result: the mean over subjects (the paper's) and over
    questions."""
    rows = [results["subjects"][s] for s in subjects if s in results["subjects"]]
    if not rows:
        return {"mean_over_subjects": None, "over_questions": None, "subjects": 0, "questions": 0}
    correct, total = sum(r["correct"] for r in rows), sum(r["total"] for r in rows)
    return {
        "mean_over_subjects": sum(r["accuracy"] for r in rows) / len(rows),
        "over_questions": correct / total,
        "subjects": len(rows),
        "questions": total,
    }


def answer_letter_loss(module, data, device) -> float:
    """Held-out loss on the answer's first token alone (its letter: " B" or "B"), through `QLoRAModule.loss_on`.

    The eval loss averages over every answer token, most of which copy the chosen choice's text; this is the one
    token that holds the model's choice. Lightning leaves a module on the CPU after `validate`/`fit` (its
    strategy's teardown): it is moved to `device` first (and `fit` moves it as it needs)."""
    import torch

    from qlora_lightning.held_out import held_out_loss

    def first_token_loss(batch):
        labels = batch["labels"]
        first = (labels != -100).int().argmax(-1)
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[torch.arange(len(labels), device=labels.device), first] = True
        return module.loss_on({**batch, "labels": torch.where(keep, labels, -100)})

    module.to(device)
    was_training = module.model.training
    module.model.eval()
    loss = held_out_loss(first_token_loss, data.val_dataloader(), module.device)
    module.model.train(was_training)
    return loss
