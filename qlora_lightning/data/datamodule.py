"""`InstructionDataModule`: instruction data to training batches as the QLoRA recipe does, resumable mid-epoch.

Pipeline: load the source (`sources.py`) → pick the subset with a fixed seed (validation first, then up to
`max_examples` training records; the same on every run and rank) → format, template and tokenize each
record once, cached → length-grouped distributed sampler (`sampler.py`) → collator (`tokenize.py`): padded rows,
or with `padding_free` one packed row per micro-batch (still `batch_size` examples, so sampling and resume are the
same).

Resume: Lightning stores `state_dict()` in every checkpoint and calls `load_state_dict()` on restore; the state
(the sampler's epoch and the examples all ranks consumed), its restoring and the conversion of Lightning's batch
counters when a run resumes on another split of the global batch are resume.py's (`data_state`,
`restore_data_position`, `PositionedLoader`); the hooks here call it.
"""

from __future__ import annotations

import os
from typing import Any, Literal, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.parsing import AttributeDict
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..resume import PositionedLoader, data_state, restore_data_position
from ..tokenizer import load_tokenizer
from .formats import get_format
from .sampler import LengthGroupedSampler
from .sources import BadRecordError, Truncation, encode_split, load_source, pick_subset
from .templates import get_template
from .tokenize import ExampleEncoder, InstructionCollator

__all__ = ["InstructionDataModule"]


class InstructionDataModule(L.LightningDataModule):
    """Instruction-tuning data for QLoRA (the constructor's arguments are the `data:` section of the config).

    Setup logs one line saying how many examples of each split the length limits cut, and by how many tokens;
    `truncation` then holds those numbers ("train", and "val" when there is validation data).

    Args:
        tokenizer: hub id or local folder of the tokenizer (the CLI links it from the model's base model);
            research code may pass a loaded tokenizer object instead.
        dataset: a hub dataset name (read with `datasets.load_dataset`), a local .jsonl/.json/.parquet/.csv
            file, a folder written by `save_to_disk`, or `bundled:orca_sample_train` for the shipped sample.
            Default: OpenOrca, the model card's training data.
        split: split of a hub dataset or of a saved DatasetDict (files are one split).
        val_dataset: a separate validation source (same kinds as `dataset`); None holds `val_size` records
            out of `dataset` instead.
        val_split: split of `val_dataset` when it is a hub dataset or DatasetDict.
        format: record layout: openorca, alpaca, oasst1, input_output (see `formats.py`).
        template: prompt template: qlora (the model card's, default), guanaco (same), alpaca, or chat (the
            tokenizer's chat template).
        max_examples: training records drawn from `dataset` with `seed`; 240000 is the model card's subset
            of OpenOrca. None uses them all.
        val_size: records held out of `dataset` for validation (before `max_examples` are drawn, so the two
            never overlap); 1024 as qlora.py's `eval_dataset_size`. Ignored when `val_dataset` is set.
        seed: picks the subset and orders every epoch; 42 as qlora.py. The same on every rank.
        source_max_len: source (prompt) tokens kept, BOS included; 384 in the paper's OpenOrca/7B setup.
        target_max_len: target (response + EOS) tokens kept; 128 in the paper's setup.
        source_truncation: which end of a too-long source is kept: "right" keeps the start (qlora.py),
            "left" keeps the end so the "### Assistant:" cue stays next to the answer.
        train_on_source: also compute the loss on the prompt; false is the paper's default (and better in
            its ablation).
        batch_size: micro-batch per device; 16 is the 7B/13B model card's batch on one GPU. An epoch holds only
            full optimizer steps of batch_size × accumulate_grad_batches × devices examples: fewer than one such
            global batch is left out of each epoch, other examples each epoch (see `sampler.py`).
        eval_batch_size: validation micro-batch per device; no gradients, so it can match or exceed training's.
        group_by_length: batch examples of similar length (the paper's setting). On OpenOrca-shaped lengths a
            padded batch is then 1.0 % padding instead of 29.4 % in random order (240,000 examples through this
            module's sampler). With `padding_free` there is no padding to save: grouping then only keeps the
            paper's batch composition (and its saw-tooth training loss), and makes the largest packed rows larger
            (8,192 tokens at batch 16 against 7,186 in random order), which sets the peak memory.
        pad_to_multiple_of: pad each batch's length up to a multiple of this (8 suits tensor cores); None
            pads to the longest sequence only. With `padding_free` it rounds up the packed row's total length.
        padding_free: put each micro-batch's examples end to end in one row, with `position_ids` restarting at 0
            for each and no `attention_mask` (see `InstructionCollator`), so no compute goes to padding, whatever
            the batch order (with `group_by_length` a padded batch wastes about 1 %, in random order about 30 %).
            False by default: the padded batch is what every other tool produces and what PEFT/transformers' loss expects;
            padding-free needs a model that reads `position_ids` (`QLoRAModule` does). Training, validation and
            test batches take this layout; predict stays padded (it generates from one prompt per row).
        num_workers: DataLoader worker processes; 2 keeps collation off the training loop, which needs little.
        num_proc: processes that tokenize (only for 10k+ records); None uses one per CPU core, at most 8.
            The tokenizer itself runs on one core here (see BENCHMARKS.md), so processes are the parallelism.
        on_bad_record: "error" stops at the first unusable record naming its file, line/row and field;
            "skip" drops bad records and reports how many in one warning.
        cache_dir: where downloaded and tokenized data are cached; None uses the datasets cache
            (HF_DATASETS_CACHE).
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        dataset: str = "Open-Orca/OpenOrca",
        split: str = "train",
        val_dataset: str | None = None,
        val_split: str = "validation",
        format: str = "openorca",
        template: str = "qlora",
        max_examples: int | None = 240000,
        val_size: int = 1024,
        seed: int = 42,
        source_max_len: int = 384,
        target_max_len: int = 128,
        source_truncation: Literal["right", "left"] = "right",
        train_on_source: bool = False,
        batch_size: int = 16,
        eval_batch_size: int = 16,
        group_by_length: bool = True,
        pad_to_multiple_of: int | None = 8,
        padding_free: bool = False,
        num_workers: int = 2,
        num_proc: int | None = None,
        on_bad_record: Literal["error", "skip"] = "error",
        cache_dir: str | None = None,
    ):
        super().__init__()
        get_format(format)  # unknown names fail here, before any data is read
        get_template(template)
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        if (max_examples is not None and max_examples < 1) or val_size < 0 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError("max_examples, batch_size and eval_batch_size must be positive and val_size >= 0")
        self._tokenizer: PreTrainedTokenizerBase | None = (
            None if tokenizer is None or isinstance(tokenizer, str) else tokenizer
        )
        self.save_hyperparameters(ignore=["tokenizer"])
        self.hparams["tokenizer"] = tokenizer if self._tokenizer is None else self._tokenizer.name_or_path
        self.train_data: Any = None  # datasets.Dataset once built (the datasets package ships no types)
        self.val_data: Any = None
        self.truncation: dict[str, Truncation] = {}  # "train"/"val" → what the length limits cut (set by setup)
        self._train_sampler: LengthGroupedSampler | None = None
        self._resume_state: dict | None = None

    @property
    def hparams(self) -> AttributeDict:
        """The saved settings (`save_hyperparameters` in `__init__`), read as attributes (`hparams.batch_size`)."""
        return cast(AttributeDict, super().hparams)  # Lightning types it as a plain mapping too; here it never is

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded on first use with `load_tokenizer` (which gives it a pad token)."""
        if self._tokenizer is None:
            if not self.hparams.tokenizer:
                raise ValueError(
                    "InstructionDataModule needs `tokenizer` (a hub id or folder; the CLI links it from the model)"
                )
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    @property
    def collator(self) -> InstructionCollator:
        """The training, validation and test collator: right padding or, with `padding_free`, packed rows."""
        return self._collator(self.hparams.padding_free)

    def _collator(self, padding_free: bool) -> InstructionCollator:
        """The collator of this data module's settings, in the given layout."""
        h = self.hparams
        longest = h.source_max_len + h.target_max_len  # the bound packed rows give varlen attention
        return InstructionCollator(
            self.tokenizer.pad_token_id, h.train_on_source, h.pad_to_multiple_of, padding_free, max_length=longest
        )

    def prepare_data(self) -> None:
        """Download and tokenize once per node (Lightning runs this on local rank 0 before `setup`)."""
        self._build()

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenized splits (from the cache that `prepare_data` filled) on every rank."""
        self._build()

    def _build(self) -> None:
        """Load, subset, check and tokenize both splits once (cached on disk, so every rank can repeat it), and
        report what the length limits cut."""
        if self.train_data is not None:
            return
        h = self.hparams
        encoder = ExampleEncoder(self.tokenizer, h.template, h.source_max_len, h.target_max_len, h.source_truncation)
        source = load_source(h.dataset, h.split, h.cache_dir)
        train_pos, val_pos = pick_subset(len(source.rows), h.seed, h.max_examples, 0 if h.val_dataset else h.val_size)
        val_source = source
        if h.val_dataset:
            val_source = load_source(h.val_dataset, h.val_split, h.cache_dir)
            val_pos = np.arange(len(val_source.rows))
        num_proc = h.num_proc or min(8, os.cpu_count() or 1)
        train, errors, train_cut = encode_split(source, train_pos, encoder, h.format, h.cache_dir, num_proc)
        val, truncation = None, {"train": train_cut}
        if len(val_pos):
            val, val_errors, val_cut = encode_split(val_source, val_pos, encoder, h.format, h.cache_dir, num_proc)
            errors += val_errors
            truncation["val"] = val_cut
        if errors and h.on_bad_record == "error":
            more = f" ({len(errors) - 1} more bad records)" if len(errors) > 1 else ""
            raise BadRecordError(f"{errors[0]}{more}; set on_bad_record: skip to drop bad records")
        skipped = f"skipped {len(errors)} bad records (on_bad_record: skip); the first: {errors[0]}" if errors else ""
        if len(train) == 0 or (val is not None and len(val) == 0):
            empty = "training" if len(train) == 0 else "validation"
            raise BadRecordError(
                f"{h.dataset}: no usable records left for {empty}" + (f": {skipped}" if skipped else "")
            )
        if skipped:
            rank_zero_warn(skipped)
        self.train_data, self.val_data, self.truncation = train, val, truncation
        split_names = {"train": "training", "val": "validation"}
        cuts = "; ".join(f"{split_names[name]}: {cut.describe()}" for name, cut in truncation.items())
        rank_zero_info(f"length limits (source_max_len {h.source_max_len}, target_max_len {h.target_max_len}): {cuts}")

    def _layout(self) -> tuple[int, int, int]:
        """(world size, global rank, accumulate_grad_batches) from the trainer; (1, 0, 1) outside one."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0, 1
        return trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        """Training batches in the sampler's length-grouped order, continuing a restored position."""
        self._build()
        h = self.hparams
        world_size, rank, accumulate = self._layout()
        sampler = LengthGroupedSampler(
            np.asarray(self.train_data["length"]),
            h.batch_size,
            accumulate=accumulate,
            num_replicas=world_size,
            rank=rank,
            seed=h.seed,
            group_by_length=h.group_by_length,
            epoch_source=(lambda: trainer.current_epoch) if (trainer := self.trainer) is not None else None,
        )
        state, self._resume_state = self._resume_state, None
        restore_data_position(self.trainer, sampler, state)
        self._train_sampler = sampler
        return self._loader(self.train_data, h.batch_size, sampler, self.collator, loader_class=PositionedLoader)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in a fixed order ([] when there is no validation data)."""
        return self._held_out(self.hparams.padding_free)

    def test_dataloader(self) -> DataLoader | list:
        """`test` scores the held-out split (loss, perplexity): instruction data has no separate test split."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader | list:
        """`predict` answers the held-out prompts (the module generates from each row's unlabelled prefix), so its
        batches are padded, one example per row, also with `padding_free`."""
        return self._held_out(padding_free=False)

    def _held_out(self, padding_free: bool) -> DataLoader | list:
        """The validation data in a fixed order, padded or packed ([] when there is none)."""
        self._build()
        if self.val_data is None:
            return []
        return self._loader(self.val_data, self.hparams.eval_batch_size, None, self._collator(padding_free))

    def _loader(
        self,
        data,
        batch_size: int,
        sampler: LengthGroupedSampler | None,
        collator: InstructionCollator,
        loader_class: type[DataLoader] = DataLoader,
    ) -> DataLoader:
        workers = self.hparams.num_workers
        return loader_class(
            data,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=collator,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def state_dict(self) -> dict:
        """The data position for resume (`resume.data_state`): sampler settings, `epoch`, and `consumed` examples."""
        return data_state(self.trainer, self._train_sampler, self.hparams.batch_size)

    def load_state_dict(self, state: dict) -> None:
        """Keep the data position to restore; the next `train_dataloader` starts right after it
        (`resume.restore_data_position`, which must run after Lightning restores its loop counters)."""
        self._resume_state = dict(state) if state else None
