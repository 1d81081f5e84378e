"""Resuming a run: what `--ckpt_path last` means, checkpoints that resume exactly, and reading them safely.

The one owner of resume state; the Lightning hooks that must live elsewhere call in here in a line or two.
- `find_last_checkpoint`, `resolve_ckpt_path`: the newest `last.ckpt` of the run under a root folder (a run whose
  save failed before its `last.ckpt`: its newest checkpoint). Lightning looks for `last` only in the new run's own
  version folder (`lightning_logs/version_<N+1>/checkpoints`), finds nothing and silently trains from step 0; the
  CLI resolves `last` here instead and fails loudly when there is none.
- `ResumableCheckpoint`: Lightning's `ModelCheckpoint` that also saves the run's final optimizer step the way
  it saves a periodic one (Lightning's own end-of-training save (`on_train_end`) records the loops as if the
  epoch had ended, so a run extended from it (same `last.ckpt`, larger `max_steps`) starts a new epoch and
  trains on other examples than the run that went straight through), saves the same way on SIGTERM and then
  exits with code 143 (`Preempted`), and repairs adapter folders a kill left behind their `.ckpt`.
- `read_checkpoint`, `load_safely`: load a `.ckpt` with `weights_only=True` (no code in the file can run), turn
  a damaged or foreign file into an error naming it and saying what to do, and never take `trust_remote_code`
  from a file (`QLoRAModule.load_from_checkpoint` delegates here).
- what a checkpoint holds and the run's identity (`adapter_only_checkpoint`, `run_record`, `check_run_matches`,
  `check_checkpoint_belongs`, `specs_from_plain`): the adapters, plain hyperparameters and a record of the run that
  a resume compares with the command line, which always decides (`QLoRAModule.on_save_checkpoint` /
  `on_load_checkpoint` call these).
- the data position (`data_state`, `restore_data_position`, `PositionedLoader`) and Lightning's loop counters
  (`data_position`, `convert_batch_progress`: the only code that reads and writes them), for the data module's
  exact mid-epoch resume (`InstructionDataModule.state_dict` / `train_dataloader` call these).
Elsewhere, each in its own owner: the sampler's order arithmetic (`data/sampler.py`: `state_dict`,
`load_state_dict`), the training RNG stream (`callbacks.TrainingRngStream`), the `.ckpt` writes and adapter folders
(`checkpoint.AtomicCheckpointIO`) and FSDP's sharded loading (`fsdp.QLoRAFSDPStrategy.load_checkpoint`), which
read through `read_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from .specs import LoraSpec, QuantSpec

__all__ = ["CheckpointError", "Preempted", "find_last_checkpoint", "read_checkpoint", "ResumableCheckpoint"]

LAST = "last.ckpt"
#: Lightning's name for a last checkpoint written beside an existing `last.ckpt` by its version counter (`last-v1.ckpt`);
#: runs of versions before the counter was switched off (`ResumableCheckpoint`) can hold one newer than `last.ckpt`.
VERSIONED_LAST = re.compile(r"last-v\d+\.ckpt")


class CheckpointError(ValueError):
    """A checkpoint cannot be used to resume: missing, damaged, foreign, or made for another model."""


def checkpoint_folders(root: str | os.PathLike) -> list[Path]:
    """Every checkpoint folder a run under `root` can have written: `<root>/checkpoints/` (no logger) and
    `<root>/<logger name>/version_<N>/checkpoints/` (Lightning's default layout, one version per run)."""
    root = Path(root)
    return sorted(p for p in [root / "checkpoints", *root.glob("*/version_*/checkpoints")] if p.is_dir())


def _resume_point(folder: Path) -> Path | None:
    """The checkpoint a run resumes from in `folder`: the newest of `last.ckpt` and any `last-vN.ckpt` (normally
    `last.ckpt` alone), else the newest other `.ckpt` (a save that failed before `last.ckpt` was written, a full disk
    at the first save say); None when there is none."""
    found = [p for p in folder.glob("*.ckpt") if p.is_file()]
    lasts = [p for p in found if p.name == LAST or VERSIONED_LAST.fullmatch(p.name)]
    return max(lasts or found, key=lambda p: p.stat().st_mtime_ns) if found else None


def find_last_checkpoint(root: str | os.PathLike, dirpath: str | os.PathLike | None = None) -> Path:
    """The checkpoint `--ckpt_path last` resumes: the `last.ckpt` in `dirpath` when the run names its checkpoint
    folder, else the most recently written one of the runs under `root` (the run's default_root_dir). A run
    folder without `last.ckpt` offers its newest other checkpoint instead; one whose `last-vN.ckpt` is newer than
    its `last.ckpt` (resumed by a version that kept Lightning's version counter) offers that; either choice is said
    on stderr.

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
    if VERSIONED_LAST.fullmatch(path.name):
        print(f"--ckpt_path last: taking {path}, written after {LAST} beside it", file=sys.stderr)
    elif path.name != LAST:
        print(
            f"--ckpt_path last: {path.parent} holds no {LAST}; taking its newest checkpoint, {path.name}",
            file=sys.stderr,
        )
    return path


def resolve_ckpt_path(ckpt_path: str, root: str | os.PathLike, dirpath: str | os.PathLike | None) -> Path | str:
    """The file `--ckpt_path` names, checked to be a readable checkpoint before the model loads. `last` is
    `find_last_checkpoint(root, dirpath)` (the run's logger save_dir or default_root_dir, and the config's
    `checkpoint.dirpath`), said on stderr; Lightning's other keywords (`best`, `hpc`) pass through."""
    if ckpt_path in ("best", "hpc"):
        return ckpt_path
    if ckpt_path == "last":
        path = find_last_checkpoint(root, dirpath)
        print(f"resuming from {path}", file=sys.stderr)
    else:
        path = Path(ckpt_path)
    read_checkpoint(path, mmap=True)  # an empty, damaged or foreign file fails here, before the model loads
    return path


#: Checkpoints written before their hyperparameters became plain data hold the two spec dataclasses under their
#: old module path; they are plain data too, so they may be read, under exactly those names.
EARLIER_CLASSES: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
    (QuantSpec, "qlora_lightning.model.QuantSpec"),
    (LoraSpec, "qlora_lightning.model.LoraSpec"),
]


def plain_hyperparameters(hparams: Any) -> dict[str, Any]:
    """A module's hyperparameters as plain data (dataclasses as dicts), for a checkpoint that loads with
    `weights_only=True` and needs nothing registered."""
    return {k: _as_plain_data(v) for k, v in dict(hparams).items()}


def _as_plain_data(value: Any) -> Any:
    """A dataclass instance as a dict; anything else as it is."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


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


def load_safely(
    load: Callable[..., Any],
    checkpoint_path: str | os.PathLike,
    map_location: Any = None,
    hparams_file: str | os.PathLike | None = None,
    strict: bool | None = None,
    weights_only: bool | None = None,
    *,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> Any:
    """Lightning's `load_from_checkpoint` (`load`), safe with a checkpoint from anyone.

    The file is checked first (`read_checkpoint`: named errors for a missing, empty, damaged or foreign file) and
    loaded with `weights_only=True` whatever `weights_only` says. `trust_remote_code` is always passed, so it is
    this call's argument only: Lightning merges the checkpoint's stored `hyper_parameters` under the call's
    keyword arguments, so an edited checkpoint saying `trust_remote_code: true` and naming a base whose folder
    ships code used to run that code. The checkpoint's `base_model` is used unless `base_model=` is passed;
    `QLoRAModule.on_load_checkpoint` then refuses adapters trained on other base weights."""
    read_checkpoint(checkpoint_path, mmap=True)
    with torch.serialization.safe_globals(EARLIER_CLASSES):
        return load(
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            weights_only=True,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )


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
      from it (the checkpoint I/O's `repair_adapter_folders`: `checkpoint.AtomicCheckpointIO`).
    """

    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        # Default off: one `last.ckpt`, replaced (atomically, by the checkpoint I/O) by every later save, a resumed
        # run's included. Lightning's counter writes `last-v1.ckpt` beside a `last.ckpt` its reloaded state does not
        # name (a relative run folder reads back absolute), and `--ckpt_path last` takes `last.ckpt`.
        # jsonargparse reads ModelCheckpoint's other arguments from this exact call form (mypy cannot see that `args`
        # never holds it: LightningCLI and our callers pass keywords)
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)  # type: ignore[misc]
        self.every_n_steps = kwargs.get("every_n_train_steps") or 0
        self._final_step_saved: int | None = None
        self._sigterm = False
        self._handler_before: Any = None
        self._launcher: Any = None
        self._step_before_batch: int | None = None
        self._step_at_start: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # The checkpoint I/O that writes adapter folders (`AtomicCheckpointIO`, a layer above) repairs them.
        repair = getattr(trainer.strategy.checkpoint_io, "repair_adapter_folders", None)
        folder = self.dirpath  # resolved by `super().setup`
        if stage == "fit" and repair is not None and trainer.is_global_zero and folder and Path(folder).is_dir():
            for note in repair(folder):
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
        last = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
        if self.save_last:  # recorded in both files, as Lightning's own save records it: a resume replaces it
            self.last_model_path = last
        # weights_only=False: the whole training state, as a periodic save writes it (said, so Lightning logs nothing)
        trainer.save_checkpoint(self.format_checkpoint_name(metrics), weights_only=False)
        if self.save_last:
            trainer.save_checkpoint(last, weights_only=False)

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


# ----------------------------------------------------------------- what a checkpoint holds: the run's identity
# What a checkpoint records of its run (`QLoRAModule.on_save_checkpoint`) and a resume compares with the
# command line, which always decides: a checkpoint's own hyperparameters are never applied to a run.
#: The prefix of the adapters' keys in a module's state dict (`QLoRAModule.model`).
MODEL_PREFIX = "model."
_MUST_MATCH = {"lora": ("r", "alpha", "target_modules", "exclude"), "quant": ("quantize", "double_quant")}
_MAY_CHANGE = {"lora": ("dropout",), "quant": ("compute_dtype", "quant_storage")}


def run_record(base_model: str, base_fingerprint: str | None, lora: Any, quant: Any) -> dict[str, Any]:
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
    conflicts: list[str] = []
    notes: list[str] = []
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


def specs_from_plain(quant: QuantSpec | dict, lora: LoraSpec | dict) -> tuple[QuantSpec, LoraSpec]:
    """The two specs as a module takes them: `load_from_checkpoint` passes back the plain dicts that
    `plain_hyperparameters` stored (lists where the dataclasses hold tuples); specs pass through unchanged."""
    if isinstance(quant, dict):
        quant = QuantSpec(**quant)
    if isinstance(lora, dict):
        targets = lora["target_modules"]
        targets = targets if isinstance(targets, str) else tuple(targets)
        lora = LoraSpec(**{**lora, "target_modules": targets, "exclude": tuple(lora["exclude"])})
    return quant, lora


def adapter_only_checkpoint(
    checkpoint: dict[str, Any], keep: Callable[[str], bool], adapter_config: dict[str, Any], run: dict[str, Any]
) -> None:
    """Make Lightning's `checkpoint`, about to be saved, what our resume reads: only the tensors whose key `keep`
    accepts (`adapters.is_adapter_key`: the frozen base is never saved), plain hyperparameters, the PEFT
    `adapter_config` that `AtomicCheckpointIO` writes beside it, and the `run_record`. Every value is plain data,
    so that it loads with `weights_only=True` and nothing else registered."""
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if keep(k)}
    checkpoint["hyper_parameters"] = plain_hyperparameters(checkpoint.get("hyper_parameters", {}))
    checkpoint["peft_adapter_config"] = adapter_config
    checkpoint["peft_key_prefix"] = MODEL_PREFIX
    checkpoint["qlora_run"] = run


def check_checkpoint_belongs(
    checkpoint: dict[str, Any],
    current: dict[str, Any],
    validate_adapters: Callable[..., None],
) -> None:
    """Check, as a run resumes, that `checkpoint`'s adapters belong to this run (`current`, its `run_record`).

    This run's settings decide: other base weights, rank, scale, targets or 4-bit type are a `CheckpointError`
    naming each difference (`check_run_matches`); a changed dropout or compute dtype is used and shown as a
    warning. The adapter tensors, where the checkpoint still holds them (under FSDP the strategy has loaded and
    removed them), go to `validate_adapters(state, config=...)` (`adapters.validate` against the model's layers,
    with the saved PEFT config for a checkpoint older than its run record); its `KeyError`/`ValueError` becomes a
    `CheckpointError`."""
    saved = checkpoint.get("qlora_run")
    if saved is not None:
        for note in check_run_matches(saved, current):
            warnings.warn(f"resuming with a changed setting: {note}", UserWarning, stacklevel=1)
    if "state_dict" in checkpoint:
        state = {k.removeprefix(MODEL_PREFIX): v for k, v in checkpoint["state_dict"].items()}
        old_config = checkpoint.get("peft_adapter_config") if saved is None else None  # written before qlora_run
        try:
            validate_adapters(state, config=old_config)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{e.args[0]} (a checkpoint of another lora/quant config?)") from e


# --------------------------------------------------------------- the data position and Lightning's loop counters
# The data module's checkpoint state is the training sampler's epoch and how many examples of it all ranks
# together consumed, counted from the trainer's processed batches, not the sampler's own count (Lightning and
# DataLoader workers fetch batches ahead). The restored sampler skips those examples once, so the resumed run
# neither repeats nor skips any. As the sampler's order depends only on the global batch, a checkpoint saved on 2
# devices resumes exactly on 1 with twice the accumulation, once Lightning's own per-rank batch counters are
# re-counted in the new micro-batches (`convert_batch_progress`).
#
# Lightning keeps no public record of how far into an epoch a run is, and restores its own batch counters after
# the data module's state. `data_position` and `convert_batch_progress` are the only code that reads or writes
# `trainer.fit_loop`'s progress counters; they were checked on Lightning 2.6.6, the range pyproject.toml declares
# (>=2.6,<2.7), by tests/test_resume*.py and tests/data/test_datamodule.py's resume tests.


class PositionedLoader(DataLoader):
    """The training DataLoader. Its position is restored by the data module (through the sampler), so it tells
    Lightning it is resumable, as Lightning's state protocol asks (`state_dict` / `load_state_dict`), instead of
    letting it warn that a mid-epoch resume is unreliable; the state itself is the data module's (`data_state`)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def data_state(trainer: Trainer | None, sampler: Any, batch_size: int) -> dict[str, Any]:
    """The data module's checkpoint state: `sampler.state_dict` at the trainer's position (`data_position`), with
    the examples all ranks consumed (`batch_size` is the micro-batch per rank); {} when not training (no sampler
    or no trainer: there is no position to keep). Lightning calls this on every rank and saves rank 0's; every
    rank has processed as many batches, so all compute the same global count."""
    if sampler is None or trainer is None:
        return {}
    epoch, processed = data_position(trainer)
    return sampler.state_dict(epoch=epoch, consumed=processed * batch_size * trainer.world_size)


def restore_data_position(trainer: Trainer | None, sampler: Any, state: dict[str, Any] | None) -> None:
    """Continue `sampler` (a new epoch's `LengthGroupedSampler`) at a checkpoint's `data_state`, and re-count the
    trainer's restored batch counters in this run's micro-batches (`convert_batch_progress`); nothing without a
    state. Called from `train_dataloader`, not the data module's `load_state_dict`: Lightning restores its loop
    counters after that call, and the conversion must see them."""
    if state is None:
        return
    sampler.load_state_dict(state)
    if trainer is not None:  # the position is the same; Lightning's counters count other micro-batches
        convert_batch_progress(
            trainer,
            state["batch_size"] * state["num_replicas"],
            sampler.batch_size * sampler.num_replicas,
            sampler.total_size,
            int(state["consumed"]),
        )


def data_position(trainer: Trainer) -> tuple[int, int]:
    """(epoch, micro-batches this rank has processed in it) as a checkpoint saved now should record them.

    At `on_train_batch_end`, where `ModelCheckpoint(every_n_train_steps)` saves, `processed` already includes
    the batch just trained; at validation and epoch-end saves it equals the batches done. A DataLoader's own
    count would be wrong, as Lightning and DataLoader workers fetch batches ahead.
    """
    loop = trainer.fit_loop
    # `_ProcessedTracker`s, which Lightning declares as their base class (without `started` and `processed`)
    epoch: Any = loop.epoch_progress.current
    batches: Any = loop.epoch_loop.batch_progress.current
    return max(epoch.started - 1, 0), batches.processed


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
    current: Any = progress.current  # `_ProcessedTracker`s, as in `data_position`
    total: Any = progress.total
    processed = min(consumed, epoch_size) // new_micro_step  # this epoch's position, in new micro-batches
    earlier = (total.processed - current.processed) * old_micro_step // new_micro_step
    shifts = ((current, processed - current.processed), (total, earlier + processed - total.processed))
    for tracker, shift in shifts:
        for field in ("ready", "started", "processed", "completed"):
            setattr(tracker, field, getattr(tracker, field) + shift)
