"""`QLoRAModule`: the LightningModule of QLoRA fine-tuning (steps, loss, metrics, optimizer, checkpoints).

Its `__init__` signature is the `model:` section of a config. The 4-bit model is built in
`configure_model`, on each rank's own device, so nothing full-size is built on the CPU first and DDP
gives every rank its own copy. Checkpoints keep only the LoRA tensors (plus optimizer, scheduler, loop,
data and RNG state for exact resume) and carry the PEFT adapter config that `AtomicCheckpointIO`
writes beside each `.ckpt`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from torch.optim.lr_scheduler import LambdaLR

from .adapters import adapter_config, is_adapter_key, save_adapter, to_peft_keys, validate
from .callbacks import NonFiniteGuard, TrainingRngStream
from .checkpoint import AtomicCheckpointIO
from .fsdp import QLoRAFSDPStrategy, sharding_strategy
from .fsdp2 import QLoRAFSDP2Strategy
from .held_out import LabelledLossSum
from .lora import lora_layers
from .model import load_model
from .preflight import check_precision, check_trains_something
from .resume import (
    EARLIER_CLASSES,
    CheckpointError,
    check_run_matches,
    plain_hyperparameters,
    read_checkpoint,
    run_record,
)
from .run_lock import RunLock
from .specs import LoraSpec, QuantSpec
from .tokenizer import load_tokenizer

#: The batch entries the model reads: a padded batch's first two, or a packed row's positions and boundaries (see
#: `data.tokenize.InstructionCollator` and `attention.varlen_attention`).
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
)


def paged_adamw(params) -> torch.optim.Optimizer:
    """The default optimizer: paged AdamW with 32-bit states, lr 2e-4, betas (0.9, 0.999), no weight decay.

    The paper's optimizer and settings for 7B/13B (paging absorbs the memory spikes of long sequences;
    configs set lr 1e-4 for 33B and larger). Override in a config with
    `optimizer: {class_path: bitsandbytes.optim.PagedAdamW32bit, init_args: {lr: …}}`.
    """
    return bnb.optim.PagedAdamW32bit(params, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0)


def examples_in(batch: dict[str, torch.Tensor]) -> int:
    """How many examples a batch holds: its rows, or `num_examples` for a packed (padding-free) row."""
    return int(batch["num_examples"]) if "num_examples" in batch else batch["input_ids"].shape[0]


def attached_trainer(module: LightningModule):
    """The trainer `module` is attached to, or None: Lightning's `trainer` property raises when there is none."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def _tuple(value: str | list | tuple) -> str | tuple:
    return value if isinstance(value, str) else tuple(value)


def compile_decoder_layers(model: torch.nn.Module, *, data_parallel: bool) -> None:
    """`torch.compile` each decoder layer of `model` into one graph (the module's `compile_layers`).

    Under DDP each layer's calls run with dynamo's DDPOptimizer switched off (for those calls only, where each
    graph is compiled), as torch documents for activation
    checkpointing (`torch._dynamo.config.optimize_ddp`, pytorch#104674; checked on torch 2.11-2.13). It splits a
    graph compiled inside DDP's forward at gradient-bucket boundaries, the first after 1 MB of parameters, so a
    7B layer's graph is split in its forward but not when checkpointing recomputes it in backward, outside
    DDP's forward: the recomputation saves other tensors than the forward did and torch.utils.checkpoint stops
    ("Recomputed values ... have different metadata": the README's DDP line with configs/7b.yaml on 2 H200s).
    The split only helps whole-model graphs overlap communication; per-layer graphs get that from DDP's hooks.
    """
    for layer in model.get_decoder().layers:
        if data_parallel:
            layer.forward = _without_ddp_optimizer(torch.compile(layer.forward))
        else:
            layer.compile()


def _without_ddp_optimizer(compiled: Callable) -> Callable:
    """`compiled`, called (and so compiled) with `torch._dynamo.config.optimize_ddp` off for its calls only."""

    def call(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(optimize_ddp=False):
            return compiled(*args, **kwargs)

    return call


class ConstantWithWarmup(LambdaLR):
    """Linear warmup over `warmup_steps` optimizer steps, then the constant base learning rate."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> None:
        super().__init__(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0)


class QLoRAModule(LightningModule):
    """QLoRA fine-tuning of a causal LM.

    Args:
        base_model: hub id or local folder of the base model (safetensors). The data module's tokenizer
            is linked to it by the CLI, so one key names the model.
        quant: how the frozen base is stored (NF4, double quantization, bf16 compute by default).
        lora: adapter rank, scale, dropout and target layers (the paper's r=64, alpha=16, all linear).
        gradient_checkpointing: recompute activations in backward (non-reentrant); the paper's setting.
        compile_layers: `torch.compile` each decoder layer into one graph: its RMSNorms, rotary embedding,
            SwiGLU, residual adds and the LoRA dropout get fused. Dropout then draws from the compiled
            RNG (same rate, other masks than eager; recomputation redraws the same ones). Off by default
            (CPU, tests), on in the GPU configs: the first step pays ~12 s of compilation for 1.27× the
            tokens/s on 7B (BENCHMARKS.md). Not supported under FSDP yet.
        offload_activations: keep each checkpointed layer's input in pinned host memory until backward,
            copied out and back on a side stream overlapped with compute (`offload.offloaded_checkpoint`, as
            Unsloth's offloaded checkpointing): one (tokens × hidden) tensor per layer leaves the GPU, 2 GiB at
            7B for 16 × 512 tokens. Needs gradient_checkpointing; not under FSDP. Off by default: the GPU
            configs turn it on where it was measured to cost no speed (BENCHMARKS.md).
        trust_remote_code: run modelling code shipped with the base model's folder; off unless asked. Taken from
            the command line or config only: it is not saved in checkpoints, and nothing read from a checkpoint
            can switch it on.
        optimizer: builds the optimizer from the LoRA parameters; paged AdamW 32-bit by default.
        scheduler: builds the LR scheduler; None gives a constant rate after `warmup_ratio` warmup.
        warmup_ratio: fraction of the run spent warming up linearly. The paper's script passes 0.03 with
            HF's "constant" schedule, which ignores warmup, so what actually ran is 0.0: the default.
        init_adapter: a PEFT LoRA adapter folder to start from (continued training, or evaluation of
            published adapters); None starts fresh (B = 0).
        predict_max_new_tokens: longest answer `predict` generates; 128, the recipe's target length.
    """

    def __init__(
        self,
        base_model: str = "meta-llama/Llama-2-7b-hf",
        quant: QuantSpec = QuantSpec(),
        lora: LoraSpec = LoraSpec(),
        gradient_checkpointing: bool = True,
        compile_layers: bool = False,
        offload_activations: bool = False,
        trust_remote_code: bool = False,
        optimizer: OptimizerCallable = paged_adamw,
        scheduler: LRSchedulerCallable | None = None,
        warmup_ratio: float = 0.0,
        init_adapter: str | None = None,
        predict_max_new_tokens: int = 128,
    ) -> None:
        super().__init__()
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
        if predict_max_new_tokens < 1:
            raise ValueError(f"model.predict_max_new_tokens must be at least 1, got {predict_max_new_tokens!r}")
        # `load_from_checkpoint` passes the specs back as the plain dicts that checkpoints store
        quant = QuantSpec(**quant) if isinstance(quant, dict) else quant
        lora = (
            LoraSpec(**{**lora, "target_modules": _tuple(lora["target_modules"]), "exclude": tuple(lora["exclude"])})
            if isinstance(lora, dict)
            else lora
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "trust_remote_code"])
        self.base_model, self.quant, self.lora = base_model, quant, lora
        self.gradient_checkpointing, self.trust_remote_code = gradient_checkpointing, trust_remote_code
        self.compile_layers, self.offload_activations = compile_layers, offload_activations
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.warmup_ratio, self.init_adapter = warmup_ratio, init_adapter
        self.predict_max_new_tokens = predict_max_new_tokens
        self.model = None
        self.base_fingerprint: str | None = None  # of the loaded base's weights (`model.weights_fingerprint`)
        self._tokenizer = None
        self._adapter_config: dict[str, Any] | None = None
        self.strict_loading = False  # checkpoints hold the adapters only, not the frozen base
        self._held_out = LabelledLossSum()  # this validation or test epoch's losses

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path,
        map_location=None,
        hparams_file=None,
        strict=None,
        weights_only=None,
        *,
        trust_remote_code: bool = False,
        **kwargs,
    ) -> QLoRAModule:
        """Lightning's `load_from_checkpoint`, safe with a checkpoint from anyone: the file is read with
        `weights_only=True` whatever `weights_only` says (`resume.read_checkpoint`, which names a damaged file), and
        `trust_remote_code` is this call's argument only. Lightning merges the checkpoint's stored
        `hyper_parameters` under the call's keyword arguments, so an edited checkpoint saying
        `trust_remote_code: true` and naming a base whose folder ships code used to run that code. The
        checkpoint's `base_model` is used unless `base_model=` is passed; `on_load_checkpoint` then refuses
        adapters trained on other base weights."""
        read_checkpoint(checkpoint_path, mmap=True)  # named errors for a missing, empty or foreign file
        with torch.serialization.safe_globals(EARLIER_CLASSES):
            return super().load_from_checkpoint(
                checkpoint_path,
                map_location=map_location,
                hparams_file=hparams_file,
                strict=strict,
                weights_only=True,
                trust_remote_code=trust_remote_code,
                **kwargs,
            )

    # ----------------------------------------------------------------------------------------- model
    def configure_callbacks(self) -> list:
        """What every trainer needs, the CLI's and a plain one alike, unless it has it: a `RunLock` (run_lock.py),
        which takes the log folder now, the first hook of a `fit`, so that no other run writes this run's folders;
        the `NonFiniteGuard` and the `TrainingRngStream` (callbacks.py)."""
        trainer = self.trainer
        present = {type(c) for c in trainer.callbacks}
        lock = next((c for c in trainer.callbacks if isinstance(c, RunLock)), None) or RunLock()
        lock.claim_log_folder(trainer)
        return [c for c in (lock, NonFiniteGuard(), TrainingRngStream()) if type(c) not in present]

    def setup(self, stage: str) -> None:
        """Refuse, before the model loads, a precision the layers cannot run and a `fit` that would train nothing
        (preflight.py)."""
        check_precision(self.trainer.precision, self.quant.compute_dtype)
        if stage == "fit":
            check_trains_something(self.trainer, self.optimizer_factory)

    def configure_model(self) -> None:
        """Load the 4-bit model with fresh (or `init_adapter`) LoRA on this rank's device; idempotent."""
        if self.model is not None:
            return
        trainer = attached_trainer(self)
        strategy = trainer.strategy if trainer is not None else None
        device = strategy.root_device if strategy is not None else self.device  # cpu unless moved
        sharding = sharding_strategy(
            strategy, self.quant, compile_layers=self.compile_layers, offload_activations=self.offload_activations
        )
        # Under FSDP the model stays on the meta device: the strategy loads it one shard unit at a time.
        loaded = load_model(
            self.base_model,
            quant=self.quant,
            lora=self.lora,
            device=device,
            adapter=self.init_adapter,
            materialize=sharding is None,
            gradient_checkpointing=self.gradient_checkpointing,
            offload_activations=self.offload_activations,
            with_tokenizer=False,
            trust_remote_code=self.trust_remote_code,
        )
        self.model = loaded.model
        self.base_fingerprint = loaded.fingerprint
        self._adapter_config = adapter_config(self.model, base_model=self.base_model)  # names before FSDP wraps
        if sharding is not None:
            sharding.load_units_with(loaded.materialize)
        if self.compile_layers:
            compile_decoder_layers(self.model, data_parallel=isinstance(strategy, DDPStrategy))
        config = self.model.config
        self._head_on_labelled_only = not any(
            getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale")
        )

    @property
    def tokenizer(self):
        """The base model's tokenizer, loaded on first use (training itself needs only the data module's)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base_model, trust_remote_code=self.trust_remote_code)
        return self._tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ----------------------------------------------------------------------------------------- steps
    def loss_on(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean causal-LM loss over the labelled (target) tokens, and their count.

        A batch is padded (`input_ids`, `attention_mask`, `labels`: one row per example) or packed (the data
        module's `padding_free`: one row of concatenated examples with `position_ids` restarting at 0 for each,
        their boundaries for variable-length attention (`attention.varlen_attention`) and no `attention_mask`, so no
        example attends to another). Both give the same loss: a mean over the same labelled tokens.

        The output head runs on the labelled positions only: with source 384 / target 128 that skips three
        quarters of the head's matmuls and of the fp32 logits that HF's loss would hold for every token.
        Models that transform their logits (soft-capping, logit scale) take transformers' own loss.
        """
        labels = batch["labels"][:, 1:]
        labelled = labels != -100
        inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
        if not self._head_on_labelled_only:
            return self.model(**inputs, labels=batch["labels"], use_cache=False).loss, labelled.sum()
        hidden = self.model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[:, :-1][labelled])
        return torch.nn.functional.cross_entropy(logits.float(), labels[labelled]), labelled.sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.loss_on(batch)
        # Averaged over ranks, as DDP averages their gradients: the loss of the whole global batch.
        self.log(
            "train/loss",
            loss,
            prog_bar=True,
            on_step=True,
            batch_size=examples_in(batch),
            sync_dist=self.trainer.world_size > 1,
        )
        return loss

    def on_validation_epoch_start(self) -> None:
        self._held_out = LabelledLossSum()

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._held_out.add(*self.loss_on(batch))

    test_step = validation_step

    def _log_held_out(self, split: str) -> None:
        """Log `<split>/loss` (the mean over every rank's labelled tokens) and `<split>/perplexity`."""
        sums = self._held_out.sums().to(self.device)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        loss = sums[0] / sums[1].clamp(min=1)
        self.log(f"{split}/loss", loss.float(), prog_bar=split == "val", sync_dist=False)
        self.log(f"{split}/perplexity", torch.exp(loss).float(), sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_held_out("val")

    def on_test_epoch_end(self) -> None:
        self._log_held_out("test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[dict[str, str]]:
        """Greedy answers to a batch's prompts (the tokens before each row's first label), with references.

        Rows are right-padded by the collator, so a prompt is the prefix up to the first labelled token;
        with `train_on_source` every token is labelled and prompts cannot be told apart: an error.
        """
        from .generate import generate

        rows = []
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            labelled = (labels != -100).nonzero()
            if len(labelled) == 0 or labelled[0].item() == 0:
                raise ValueError("predict needs prompts without labels: set data.train_on_source false")
            start = labelled[0].item()
            rows.append(
                (
                    self.tokenizer.decode(ids[:start], skip_special_tokens=True),
                    self.tokenizer.decode(ids[labels != -100], skip_special_tokens=True),
                )
            )
        # Compiled layers would recompile for every cache length while generating token by token: run eagerly.
        with torch.compiler.set_stance("force_eager"):
            answers = generate(
                self.model,
                self.tokenizer,
                [prompt for prompt, _ in rows],
                template=None,
                max_new_tokens=self.predict_max_new_tokens,
            )
        return [{"prompt": p, "answer": a, "reference": r} for (p, r), a in zip(rows, answers)]

    # ------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            total = self.trainer.estimated_stepping_batches
            if self.warmup_ratio > 0 and not math.isfinite(total):
                raise ValueError("model.warmup_ratio needs a finite run: set trainer.max_steps or max_epochs")
            scheduler = ConstantWithWarmup(
                optimizer, warmup_steps=round(self.warmup_ratio * total) if self.warmup_ratio else 0
            )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as configured (the paper: global norm 0.3); under FSDP the strategy clips across the ranks' shards
        (`QLoRAFSDPStrategy.clip_gradients`, `QLoRAFSDP2Strategy.clip_gradients`)."""
        strategy = self.trainer.strategy
        if isinstance(strategy, (QLoRAFSDPStrategy, QLoRAFSDP2Strategy)) and gradient_clip_val:
            strategy.clip_gradients(gradient_clip_val, gradient_clip_algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ----------------------------------------------------------------------------------- checkpoints
    def adapter_config(self) -> dict[str, Any]:
        """The PEFT adapter_config.json of this module's adapters (read from the layers when the model loaded)."""
        return self._adapter_config

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only LoRA tensors in the state dict; add what PEFT export and exact resume need. Every value is
        plain data, so that checkpoints load with `weights_only=True` and nothing else registered."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter_key(k)}
        checkpoint["hyper_parameters"] = plain_hyperparameters(checkpoint.get("hyper_parameters", {}))
        checkpoint["peft_adapter_config"] = self.adapter_config()
        checkpoint["peft_key_prefix"] = "model."
        checkpoint["qlora_run"] = run_record(self.base_model, self.base_fingerprint, self.lora, self.quant)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint's adapters belong to this run.

        This run's settings (command line and config) decide: a checkpoint of another base's weights, rank,
        scale, targets or 4-bit type is a `CheckpointError` naming each difference; a changed dropout or
        compute dtype is used and reported. Under FSDP, Lightning has loaded (and removed) the tensors
        before this hook, so only the saved settings are compared there.
        """
        self.configure_model()
        saved = checkpoint.get("qlora_run")
        if saved is not None:
            current = run_record(self.base_model, self.base_fingerprint, self.lora, self.quant)
            for note in check_run_matches(saved, current):
                warnings.warn(f"resuming with a changed setting: {note}", UserWarning, stacklevel=1)
        if "state_dict" in checkpoint:
            state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
            old_config = checkpoint.get("peft_adapter_config") if saved is None else None  # written before qlora_run
            try:
                validate(lora_layers(self.model), state, source="the checkpoint", config=old_config)
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"{e.args[0]} (a checkpoint of another lora/quant config?)") from e

    def on_fit_start(self) -> None:
        if not isinstance(self.trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            warnings.warn(
                "the trainer's checkpoint_io is not qlora_lightning.AtomicCheckpointIO: saves are not "
                "atomic and no PEFT adapter folder is written beside each checkpoint; pass "
                "plugins=[AtomicCheckpointIO()] to the Trainer",
                stacklevel=1,
            )

    def on_fit_end(self) -> None:
        """Export the final adapter as a PEFT folder `<log dir>/adapter`."""
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "adapter"  # a collective: all ranks
        # The strategy's state dict: under FSDP the sharded adapters are gathered on rank 0 (a collective).
        state = self.trainer.strategy.lightning_module_state_dict()
        if self.trainer.is_global_zero:
            save_adapter(
                folder,
                to_peft_keys(state, prefix="model."),
                self.adapter_config(),
                step=self.trainer.global_step,
                base_fingerprint=self.base_fingerprint,
            )
            print(f"final adapter written to {folder}")
