"""Resuming a run: what `--ckpt_path last` means, checkpoints that resume exactly, and reading them safely.

- `find_last_checkpoint`: the newest `last.ckpt` of the run under a root folder (a run whose save failed before
  its `last.ckpt`: its newest checkpoint). Lightning looks for `last` only in the new run's own version folder
  (`lightning_logs/version_<N+1>/checkpoints`), finds nothing and silently trains from step 0; the CLI resolves
  `last` here instead and fails loudly when there is none.
- `ResumableCheckpoint`: Lightning's `ModelCheckpoint` that also saves the run's final optimizer step the way
  it saves a periodic one (Lightning's own end-of-training save (`on_train_end`) records the loops as if the
  epoch had ended, so a run extended from it (same `last.ckpt`, larger `max_steps`) starts a new epoch and
  trains on other examples than the run that went straight through), saves the same way on SIGTERM and then
  exits with code 143 (`Preempted`), and repairs adapter folders a kill left behind their `.ckpt`.
- `read_checkpoint`: loads a `.ckpt` with `weights_only=True` (no code in the file can run) and turns
  a damaged or foreign file into an error naming it and saying what to do.
- the run's identity (`run_record`, `check_run_matches`): what a checkpoint records of its run and a resume
  compares with the command line, which always decides.
- Lightning's loop counters (`data_position`, `convert_batch_progress`): the two places that read and write
  them, for the data module's exact mid-epoch resume.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["CheckpointError", "Preempted", "find_last_checkpoint", "read_checkpoint", "ResumableCheckpoint"]

LAST = "last.ckpt"


class CheckpointError(ValueError):
    """A checkpoint cannot be used to resume: missing, damaged, foreign, or made for another model."""


def checkpoint_folders(root: str | os.PathLike) -> list[Path]:
    """Every checkpoint folder a run under `root` can have written: `<root>/checkpoints/` (no logger) and
    `<root>/<logger name>/version_<N>/checkpoints/` (Lightning's default layout, one version per run)."""
    root = Path(root)
    return sorted(p for p in [root / "checkpoints", *root.glob("*/version_*/checkpoints")] if p.is_dir())


def _resume_point(folder: Path) -> Path | None:
    """The checkpoint a run resumes from in `folder`: `last.ckpt`, else the newest other `.ckpt` (a save that
    failed before `last.ckpt` was written, a full disk at the first save say); None when there is none."""
    if (folder / LAST).is_file():
        return folder / LAST
    found = [p for p in folder.glob("*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def find_last_checkpoint(root: str | os.PathLike, dirpath: str | os.PathLike | None = None) -> Path:
    """The checkpoint `--ckpt_path last` resumes: the `last.ckpt` in `dirpath` when the run names its checkpoint
    folder, else the most recently written one of the runs under `root` (the run's default_root_dir). A run
    folder without `last.ckpt` offers its newest other checkpoint instead, and the choice is said on stderr.

    Raises `CheckpointError` naming where it looked when there is none: asked to resume, training from
    scratch instead would silently throw the earlier run away.
    """
    if dirpath is not None:
        folders = [Path(dirpath)]
        where = str(folders[0])
    else:
        folders = checkpoint_folders(root)
        where = f"{Path(root) / 'checkpoints'} or {Path(root) / '*' / 'version_*' / 'checkpoints'}"
    found = [p for p in map(_resume_point, folders) if p is not None]
    if not found:
        raise CheckpointError(
            f"--ckpt_path last: no checkpoint found (looked for {LAST} or another .ckpt in {where}). To start a "
            "new run, leave out --ckpt_path; to resume another run, pass its --trainer.default_root_dir or the "
            "path of its .ckpt file"
        )
    path = max(found, key=lambda p: p.stat().st_mtime_ns)
    if path.name != LAST:
        print(
            f"--ckpt_path last: {path.parent} holds no {LAST}; taking its newest checkpoint, {path.name}",
            file=sys.stderr,
        )
    return path


def _earlier_classes() -> list:
    """Checkpoints written before their hyperparameters became plain data hold the two spec dataclasses under
    their old module path; they are plain data too, so they may be read, under exactly those names."""
    from .specs import LoraSpec, QuantSpec

    return [(QuantSpec, "qlora_lightning.model.QuantSpec"), (LoraSpec, "qlora_lightning.model.LoraSpec")]


EARLIER_CLASSES = _earlier_classes()


def plain_hyperparameters(hparams: Any) -> dict[str, Any]:
    """A module's hyperparameters as plain data (dataclasses as dicts), for a checkpoint that loads with
    `weights_only=True` and needs nothing registered."""
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in dict(hparams).items()}


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's contents, read with `weights_only=True`: tensors and plain data only, so nothing in the
    file can run code. An empty, truncated or foreign file raises `CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"{path}: the file is empty (a save interrupted before this toolkit's atomic writes?); "
            "resume from another checkpoint"
        )
    try:
        with torch.serialization.safe_globals(EARLIER_CLASSES):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a checkpoint this toolkit can read ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
            "It is damaged, or was not written by qlora-lightning; checkpoints are read with weights_only=True so "
            "that no code in them can run: do not load a file you did not create with weights_only=False"
        ) from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint and "loops" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict or loop state in it)")
    return checkpoint


class Preempted(SystemExit):
    """Training stopped on SIGTERM after saving a checkpoint to resume from. A `SystemExit` with code 143 (128 +
    SIGTERM, what a shell reports for a process SIGTERM ended): schedulers record the run as not finished."""

    def __init__(self, message: str) -> None:
        super().__init__(128 + signal.SIGTERM)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ResumableCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose every save resumes exactly, the run's last one included, and which saves before
    the run ends on SIGTERM.

    Arguments as `ModelCheckpoint`.
    - When training stops at `max_steps` (or a callback stops it), the final optimizer step is saved from
      `on_train_batch_end`, exactly as a periodic save (`step=<N>.ckpt` and `last.ckpt`), and Lightning's later
      `on_train_end` save is skipped (also when a resumed run had nothing left to train): that one records the
      epoch as finished, so extending the run from it would replay other data.
    - SIGTERM (what SLURM and Kubernetes send before they stop a job) is taken over while training runs. Lightning
      would end the run with exit code 0 and nothing saved since the last periodic save; here the run goes on to
      the end of the current optimizer step (all ranks agree on which), saves it like a periodic save, and raises
      `Preempted` (exit code 143, no final adapter). `--ckpt_path last` then continues it bit for bit. Under DDP
      the signal is passed on to the processes the launcher started, as Lightning does.
    - When a run starts in a checkpoint folder, adapter folders a kill left behind their `.ckpt` are rewritten
      from it (`checkpoint.repair_adapter_folders`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.every_n_steps = kwargs.get("every_n_train_steps") or 0
        self._final_step_saved: int | None = None
        self._sigterm = False
        self._handler_before: Any = None
        self._launcher: Any = None
        self._step_before_batch: int | None = None
        self._step_at_start: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        from .checkpoint import AtomicCheckpointIO, repair_adapter_folders

        writes_folders = isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
        if stage == "fit" and writes_folders and trainer.is_global_zero and Path(self.dirpath).is_dir():
            for note in repair_adapter_folders(self.dirpath):
                print(note, file=sys.stderr)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._sigterm, self._launcher = False, trainer.strategy.launcher
        self._step_at_start = trainer.global_step
        if threading.current_thread() is threading.main_thread():  # Python sets handlers there only
            self._handler_before = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self._sigterm and self._launcher is not None:
            self._launcher.kill(signum)
        self._sigterm = True

    def _restore_handler(self) -> None:
        if self._handler_before is not None:
            signal.signal(signal.SIGTERM, self._handler_before)
            self._handler_before = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_before_batch = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        final = (0 < trainer.max_steps <= step) or trainer.should_stop
        if final and self._final_step_saved != step and not trainer.sanity_checking:
            self._final_step_saved = step
            self._save_like_a_periodic_save(trainer)
        elif step != self._step_before_batch and self._sigterm_on_any_rank(trainer, pl_module):
            self._save_like_a_periodic_save(trainer)
            raise Preempted(
                f"SIGTERM: training stopped after step {step}, saved in {self.dirpath}; continue it with "
                "--ckpt_path last (exit code 143: the run is not finished)"
            )

    def _save_like_a_periodic_save(self, trainer: Trainer) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            return  # the periodic save has just written this step
        metrics = {"step": torch.tensor(step), "epoch": torch.tensor(trainer.current_epoch)}
        trainer.save_checkpoint(self.format_checkpoint_name(metrics))
        if self.save_last:
            trainer.save_checkpoint(self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST))

    def _sigterm_on_any_rank(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Whether any process got SIGTERM; all ranks take the same decision at the same step."""
        if trainer.world_size == 1:
            return self._sigterm
        flag = torch.tensor(float(self._sigterm), device=pl_module.device)
        return bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Lightning's end-of-training save only where this run trained a step it has not saved: a resume that
        finds its `max_steps` reached keeps the checkpoint it resumed from, which extends exactly."""
        self._restore_handler()
        if trainer.global_step not in (self._final_step_saved, self._step_at_start):
            super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if isinstance(exception, Preempted) and trainer.is_global_zero:
            print(exception.message, file=sys.stderr)


# --------------------------------------------------------------------------------- the run's identity
# What a checkpoint records of its run (`QLoRAModule.on_save_checkpoint`) and a resume compares with the
# command line, which always decides: a checkpoint's own hyperparameters are never applied to a run.
_MUST_MATCH = {"lora": ("r", "alpha", "target_modules", "exclude"), "quant": ("quantize", "double_quant")}
_MAY_CHANGE = {"lora": ("dropout",), "quant": ("compute_dtype", "quant_storage")}


def run_record(base_model: str, base_fingerprint: str, lora: Any, quant: Any) -> dict[str, Any]:
    """The identity of a run's adapters: the base (name and `model.weights_fingerprint`) and the LoRA and
    quantization specs, as plain data."""
    return {
        "base_model": base_model,
        "base_fingerprint": base_fingerprint,
        "lora": dataclasses.asdict(lora),
        "quant": dataclasses.asdict(quant),
    }


def check_run_matches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Compare a checkpoint's `run_record` with this run's: raise `CheckpointError` listing every setting the
    adapters cannot be resumed across (another base's weights, rank, scale, targets, 4-bit type); return a
    note for each setting the command line changes harmlessly (dropout, compute dtype), to be shown."""
    conflicts, notes = [], []
    if saved["base_fingerprint"] != current["base_fingerprint"]:
        conflicts.append(
            f"model.base_model: the checkpoint trained on {saved['base_model']!r} (weights "
            f"{saved['base_fingerprint']}), this run loads {current['base_model']!r} (weights "
            f"{current['base_fingerprint']})"
        )
    for changes, out in ((_MUST_MATCH, conflicts), (_MAY_CHANGE, notes)):
        for group, keys in changes.items():
            for key in keys:
                before, now = saved[group].get(key), current[group].get(key)
                if _plain(before) != _plain(now):
                    out.append(f"model.{group}.{key}: checkpoint {before!r}, this run {now!r}")
    if conflicts:
        raise CheckpointError(
            "the checkpoint does not match this run: " + "; ".join(conflicts) + ". A resumed run "
            "takes its settings from the command line and config, never from the checkpoint: set "
            "these to the checkpoint's values, or start a new run without --ckpt_path"
        )
    return notes


def _plain(value: Any) -> Any:
    """Lists and tuples compare equal (a config gives lists where the dataclass default is a tuple)."""
    return tuple(value) if isinstance(value, list) else value


# ------------------------------------------------------------------------------- Lightning's loop counters
# Lightning keeps no public record of how far into an epoch a run is, and restores its own batch counters after
# the data module's state. These two functions are the only code that reads or writes `trainer.fit_loop`'s
# progress counters; they were checked on Lightning 2.6.6, the range pyproject.toml declares (>=2.6,<2.7), by
# tests/test_resume*.py and tests/data/test_datamodule.py's resume tests.


def data_position(trainer: Trainer) -> tuple[int, int]:
    """(epoch, micro-batches this rank has processed in it) as a checkpoint saved now should record them.

    At `on_train_batch_end`, where `ModelCheckpoint(every_n_train_steps)` saves, `processed` already includes
    the batch just trained; at validation and epoch-end saves it equals the batches done. A DataLoader's own
    count would be wrong, as Lightning and DataLoader workers fetch batches ahead.
    """
    loop = trainer.fit_loop
    return max(loop.epoch_progress.current.started - 1, 0), loop.epoch_loop.batch_progress.current.processed


def convert_batch_progress(
    trainer: Trainer, old_micro_step: int, new_micro_step: int, epoch_size: int, consumed: int
) -> None:
    """Re-count Lightning's restored batch counters in this run's micro-batches, when a run resumes with another
    split of the same global batch (say micro-batch 8 on 2 ranks → micro-batch 8 × accumulation 2 on 1).

    `old_micro_step` / `new_micro_step` are the examples one micro-batch on every rank consumed before and now
    (`batch_size × world size`), `consumed` the examples of the current epoch all ranks consumed, `epoch_size`
    the examples an epoch holds. Lightning restores its loops after the data module's `load_state_dict` and
    before its `train_dataloader`, where this runs, so the counters still count the checkpoint's micro-batches:
    `current.ready` decides the accumulation boundary (`current.ready % accumulate_grad_batches`) and the epoch
    end (`current.ready == num_training_batches`), and `data_fetcher.fetched` starts from it. `current` (this
    epoch) is set to the restored position in new micro-batches and the earlier epochs in `total` are converted
    alike (whole epochs of full optimizer steps: exact). Each counter keeps its offset from `processed` (e.g.
    `completed = processed - 1` for a save at `on_train_batch_end`), as Lightning's restart logic reads those
    offsets. `global_step` and the optimizer/scheduler progress count optimizer steps, which stay.
    """
    if old_micro_step == new_micro_step:
        return
    progress = trainer.fit_loop.epoch_loop.batch_progress
    current, total = progress.current, progress.total
    processed = min(consumed, epoch_size) // new_micro_step  # this epoch's position, in new micro-batches
    earlier = (total.processed - current.processed) * old_micro_step // new_micro_step
    shifts = ((current, processed - current.processed), (total, earlier + processed - total.processed))
    for tracker, shift in shifts:
        for field in ("ready", "started", "processed", "completed"):
            setattr(tracker, field, getattr(tracker, field) + shift)
