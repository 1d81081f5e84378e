"""The command line: LightningCLI for `fit`/`validate`/`test`/`predict`, plus the extra subcommands.

`python train.py fit --config configs/7b.yaml` and `qlora-lightning fit --config …` run the same CLI.
`eval mmlu`, `generate`, `export` and `plot-loss` dispatch to typed functions whose signatures are
their configs (`qlora-lightning generate --help`).
"""

from __future__ import annotations

import sys
from typing import Callable

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .data import InstructionDataModule
from .module import QLoRAModule


class QLoRACLI(LightningCLI):
    """LightningCLI with the base model's name linked to the data module's tokenizer and a `checkpoint:`
    section (Lightning's `ModelCheckpoint`) whose defaults suit long QLoRA runs."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.base_model", "data.tokenizer")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.filename": "{step}",  # step=500.ckpt (+ its PEFT folder step=500/)
            "checkpoint.save_last": True,  # last.ckpt: what `--ckpt_path last` resumes
            "checkpoint.save_top_k": -1,  # keep every periodic save (adapters are small)
            "checkpoint.every_n_train_steps": 500,  # ~20 saves over the 10000-step 7B run
        })

    def before_instantiate_classes(self) -> None:
        """CSV logs by default (Lightning would pick TensorBoard wherever it happens to be installed), in
        `<default_root_dir>/lightning_logs`; any `trainer.logger` in the config is kept."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        if trainer.get("logger") in (None, True):
            trainer["logger"] = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                          init_args=Namespace(save_dir=trainer.get("default_root_dir") or "."))


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
    return QLoRACLI(QLoRAModule, InstructionDataModule, trainer_defaults=trainer_defaults(),
                    save_config_kwargs={"overwrite": True}, args=args, run=run)


def _extra_commands() -> dict[str, Callable]:
    from .eval.mmlu import evaluate_mmlu
    from .export import export_merged
    from .generate import generate_cli
    from .plot import plot_loss

    return {"eval mmlu": evaluate_mmlu, "generate": generate_cli, "export": export_merged, "plot-loss": plot_loss}


def main(argv: list[str] | None = None) -> None:
    """Entry point of `qlora-lightning` and `train.py`."""
    args = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _extra_commands() if argv and argv[0] in ("eval", "generate", "export", "plot-loss") else {}
    for name, fn in commands.items():
        words = name.split()
        if argv[: len(words)] == words:
            from jsonargparse import CLI

            CLI(fn, args=argv[len(words):], as_positional=False)
            return
    if commands:
        raise SystemExit(f"unknown command {' '.join(argv[:2])!r}; extra commands: {', '.join(commands)}")
    run_lightning_cli(args)
