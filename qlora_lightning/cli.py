"""The command line: LightningCLI for `fit`/`validate`/`test`/`predict`, plus the extra subcommands.

`python train.py fit --config configs/7b.yaml` and `qlora-lightning fit --config …` run the same CLI.
`eval mmlu`, `generate`, `export` and `plot-loss` dispatch to typed functions whose signatures are
their configs (`qlora-lightning generate --help`).
"""

from __future__ import annotations

import os
import re
import sys
import warnings


def _process_settings() -> None:
    """What this entry point sets for the whole process, before torch and bitsandbytes load.

    - `OMP_WAIT_POLICY=PASSIVE` (an explicit setting wins): bitsandbytes' CPU kernels use the system OpenMP
      runtime and torch its own; with both spinning after each parallel region, 2 CPU cores spend most of a
      training step waiting (seen here: 60-80 s vs 13 s a SmolLM2 step).

    - Lightning's warning that `QLoRAModule` overrides `transfer_batch_to_device` while a data module is passed is
      silenced: the module's hook (labels left on the host, `module.HOST_ENTRIES`) is the one meant to run, with
      any data module; the warning read like a misconfiguration on every run.

    (The package's import has already hidden the `kernels` package: `hub_kernels.py`.)
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    warnings.filterwarnings("ignore", message="You have overridden `transfer_batch_to_device` in `LightningModule`")


_process_settings()

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

from jsonargparse import Namespace  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.accelerators import CPUAccelerator  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from .callbacks import training_monitors  # noqa: E402
from .preflight import SettingError  # noqa: E402
from .resume import CheckpointError, ResumableCheckpoint, resolve_ckpt_path  # noqa: E402
from .run_lock import RunFolderError, check_run_folder  # noqa: E402

# Errors of the user's settings or files, each naming what to change: printed without a traceback.
USER_ERRORS = (CheckpointError, SettingError, RunFolderError)


class QLoRACLI(LightningCLI):
    """LightningCLI with the base model's name linked to the data module's tokenizer, a `checkpoint:` section
    (`ResumableCheckpoint`) whose defaults suit long QLoRA runs, and a `--ckpt_path` that resumes the run the
    user means and never lets the checkpoint override the command line."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.base_model", "data.tokenizer")
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "{step}",  # step=500.ckpt (+ its PEFT folder step=500/)
                "checkpoint.save_last": True,  # last.ckpt: what `--ckpt_path last` resumes
                "checkpoint.save_top_k": -1,  # keep every periodic save (adapters are small)
                "checkpoint.every_n_train_steps": 500,  # ~20 saves over the 10000-step 7B run
            }
        )

    def _parse_ckpt_path(self) -> None:
        """Do nothing: LightningCLI's own version (checked on Lightning 2.4–2.6.6) parses the `hyper_parameters`
        stored in the `--ckpt_path` file over the command line and config. Then every `--model.*` flag was
        silently dropped on resume, and an edited checkpoint could switch on `trust_remote_code` or swap the
        base model. Here the command line decides; `QLoRAModule.on_load_checkpoint` compares the checkpoint
        with it and names any conflict."""

    def before_instantiate_classes(self) -> None:
        """CSV logs by default (Lightning would pick TensorBoard wherever it happens to be installed), in
        `<default_root_dir>/lightning_logs`; any `trainer.logger` in the config is kept. `--ckpt_path last` is
        resolved to the run's newest `last.ckpt` (see `resume.find_last_checkpoint`) and any checkpoint is
        checked to be readable before the model is loaded."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        if trainer.get("logger") in (None, True):
            trainer["logger"] = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger",
                init_args=Namespace(save_dir=trainer.get("default_root_dir") or "."),
            )
        if config.get("ckpt_path"):
            resume_from(config)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Lightning's trainer, refused when it would start more CPU processes than there are cores (before any
        process starts: `check_cpu_devices`)."""
        trainer = super().instantiate_trainer(**kwargs)
        check_cpu_devices(trainer)
        add_training_monitors(trainer)
        return trainer

    def before_fit(self) -> None:
        """The log folder must be writable. `run_lock.RunLock` checks it too, but under DDP it raises only in the
        callbacks' `setup`, after Lightning's logger has failed to create the folder with a bare `OSError`."""
        loggers = self.trainer.loggers
        root = (loggers[0].save_dir if loggers else None) or self.trainer.default_root_dir
        check_run_folder(root, "trainer.default_root_dir")


def resume_from(config: Namespace) -> None:
    """Resolve the config's `ckpt_path` (`resume.resolve_ckpt_path`: `last` is the newest `last.ckpt` of the run
    under the logger's save_dir or `checkpoint.dirpath`), and have a resumed `last` keep saving into its folder."""
    init_args = getattr(config["trainer"].get("logger"), "init_args", None) or {}
    root = init_args.get("save_dir") or config["trainer"].get("default_root_dir") or "."
    path = resolve_ckpt_path(config["ckpt_path"], root, config["checkpoint"].get("dirpath"))
    if config["ckpt_path"] == "last" and isinstance(path, Path):  # `last` resolves to a file
        config["checkpoint"]["dirpath"] = str(path.parent)
    config["ckpt_path"] = str(path)


def add_training_monitors(trainer: Trainer) -> None:
    """Log the learning rate, tokens per second and peak memory of every run (`callbacks.training_monitors`),
    each unless the config lists a callback of its type already."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector, undeclared
    present = {type(c) for c in callbacks}
    monitors = training_monitors(with_logger=bool(trainer.loggers))
    callbacks[:0] = [c for c in monitors if type(c) not in present]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: what `taskset` or a cluster's cgroup leaves it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_cpu_devices(trainer: Trainer) -> None:
    """Refuse more CPU training processes than cores: `--trainer.devices 64` on a 2-core machine started 64
    processes, each with its own copy of the model (9 GB in 20 s), without a word."""
    cores = available_cores()
    if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices > cores:
        raise SettingError(
            f"trainer.devices {trainer.num_devices} on the CPU starts {trainer.num_devices} processes, each holding "
            f"the whole model, but this process may use {cores} CPU cores: use --trainer.devices {cores} or fewer "
            "(1 is fastest where there are few cores)"
        )


def trainer_defaults() -> dict:
    """Trainer settings every QLoRA run wants unless the config says otherwise.

    - `AtomicCheckpointIO`: atomic saves with a PEFT adapter folder beside each `.ckpt`;
    - bf16-true precision (the paper's compute dtype; LoRA weights are bf16 too) and clipping at 0.3
      (the paper's max gradient norm).
    """
    return {
        "plugins": [{"class_path": "qlora_lightning.checkpoint.AtomicCheckpointIO"}],
        "precision": "bf16-true",
        "gradient_clip_val": 0.3,
        "gradient_clip_algorithm": "norm",
    }


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> QLoRACLI:
    """Run the LightningCLI (`fit`, `validate`, `test`, `predict`) on `args` (default: sys.argv).

    With `run=False` the arguments carry no subcommand and the CLI only builds the model, data module
    and trainer (for research code and tests).
    """
    from .data.datamodule import InstructionDataModule
    from .module import QLoRAModule

    return QLoRACLI(
        QLoRAModule,
        InstructionDataModule,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def _extra_commands() -> dict[str, Callable]:
    from .eval.mmlu import evaluate_mmlu
    from .export import export_model
    from .generate import generate_cli
    from .plot import plot_loss

    return {"eval mmlu": evaluate_mmlu, "generate": generate_cli, "export": export_model, "plot-loss": plot_loss}


_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-inf|-nan", re.IGNORECASE)


def join_negative_values(argv: list[str]) -> list[str]:
    """`--key -1e-3` as `--key=-1e-3`: argparse reads a word starting with `-` that is not a plain decimal as an
    option, and answered `--model.optimizer.init_args.lr -1e-3` with "expected one argument" instead of letting
    the value reach the check that names what is wrong with it."""
    joined: list[str] = []
    for word in argv:
        if joined and _NEGATIVE_NUMBER.fullmatch(word) and joined[-1].startswith("--") and "=" not in joined[-1]:
            joined[-1] = f"{joined[-1]}={word}"
        else:
            joined.append(word)
    return joined


def main(argv: list[str] | None = None) -> None:
    """Entry point of `qlora-lightning` and `train.py`."""
    if argv is None:  # LightningCLI reads sys.argv itself (and warns when also given args)
        sys.argv[1:] = join_negative_values(sys.argv[1:])
        args, argv = None, sys.argv[1:]
    else:
        args = argv = join_negative_values(list(argv))
    commands = _extra_commands() if argv and argv[0] in ("eval", "generate", "export", "plot-loss") else {}
    for name, fn in commands.items():
        words = name.split()
        if argv[: len(words)] == words:
            from jsonargparse import CLI

            CLI(fn, args=argv[len(words) :], as_positional=False)
            return
    if commands:
        raise SystemExit(f"unknown command {' '.join(argv[:2])!r}; extra commands: {', '.join(commands)}")
    try:
        run_lightning_cli(args)
    except USER_ERRORS as e:  # say what and where, without a traceback
        raise SystemExit(f"error: {e}") from None
    except SystemExit:  # a deliberate exit (SIGTERM's 143 after saving): the process group ends cleanly too
        _leave_process_group()
        raise
    _leave_process_group()


def _leave_process_group() -> None:
    """End the distributed process group a multi-process run started, while the interpreter is still whole.

    Left to interpreter exit, gloo's worker threads still hold work objects with tensors, whose destruction during
    finalisation aborts the process ("terminate called without an active exception", SIGABRT) after a run that
    finished: now and then on the CPU, seen in the two-node test under load (the mechanism as described in
    pytorch#179291). Not after an unexpected error, where another rank may still wait in a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
