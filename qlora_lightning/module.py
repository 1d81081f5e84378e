"""`QLoRAModule`: the LightningModule of QLoRA fine-tuning: the training step, the optimizer, the model's life cycle.

Its `__init__` signature is the `model:` section of a config. The 4-bit model is built in
`configure_model`, on each rank's own device, so nothing full-size is built on the CPU first and DDP
gives every rank its own copy. Checkpoints keep only the LoRA tensors (plus optimizer, scheduler, loop,
data and RNG state for exact resume) and carry the PEFT adapter config that `AtomicCheckpointIO`
writes beside each `.ckpt`. What is not the module's job is its owner's, called in a line: what a checkpoint holds
and whether it belongs to this run (resume.py), the held-out loss (held_out.py), `predict`'s generation
(generate.py), the guards and monitors (callbacks.py, run_lock.py), FSDP (fsdp.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from torch.optim.lr_scheduler import LambdaLR
from transformers.modeling_layers import GradientCheckpointingLayer

from .adapters import adapter_config, is_adapter_key, validate
from .callbacks import NonFiniteGuard, TrainingRngStream
from .checkpoint import save_final_adapter, warn_unless_atomic
from .fsdp import QLoRAFSDPStrategy, sharding_strategy
from .fsdp2 import QLoRAFSDP2Strategy
from .generate import answer_batch
from .held_out import LabelledLossSum, log_held_out
from .lora import lora_layers
from .lora_autograd import COMPILE_OPTIONS
from .model import load_model
from .offload import offloaded_checkpoint
from .optim import PagedAdamW32bitOneSync
from .preflight import check_precision, check_trains_something
from .resume import (
    adapter_only_checkpoint,
    check_checkpoint_belongs,
    load_safely,
    run_record,
    specs_from_plain,
)
from .run_lock import RunLock
from .specs import LoraSpec, QuantSpec
from .tokenizer import load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

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


#: The batch entries that stay on the host (`QLoRAModule.transfer_batch_to_device`): the labels, from which `loss_on`
#: finds the labelled positions there (`labelled_positions`), and a packed row's example count (`examples_in`).
#: Read on the device, each would make the host wait for the device at the end of every forward.
HOST_ENTRIES = ("labels", "num_examples")


def paged_adamw(params) -> torch.optim.Optimizer:
    """The default optimizer: paged AdamW with 32-bit states, lr 2e-4, betas (0.9, 0.999), no weight decay.

    The paper's optimizer and settings for 7B/13B (paging absorbs the memory spikes of long sequences;
    configs set lr 1e-4 for 33B and larger), as `optim.PagedAdamW32bitOneSync`: bitsandbytes' update, bitwise, in
    one launch per step instead of one per parameter (a packed 7B step 0.544 → 0.522 s on an H200, BENCHMARKS.md).
    Override in a config with `optimizer: {class_path: bitsandbytes.optim.PagedAdamW32bit, init_args: {lr: …}}`.
    """
    return PagedAdamW32bitOneSync(params, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0)


def examples_in(batch: dict[str, torch.Tensor]) -> int:
    """How many examples a batch holds: its rows, or `num_examples` for a packed (padding-free) row."""
    return int(batch["num_examples"]) if "num_examples" in batch else batch["input_ids"].shape[0]


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a causal loss reads from (batch × positions) `labels`: the rows of the flattened hidden states whose next
    token is labelled (not -100), in order, and those tokens. Found where `labels` are: on the host no device waits
    (on a GPU, counting them is a synchronization, a few ms of idle card at 7B)."""
    following = labels[:, 1:]
    row, position = (following != -100).nonzero(as_tuple=True)
    return row * labels.shape[1] + position, following[row, position]


def attached_trainer(module: LightningModule):
    """The trainer `module` is attached to, or None: Lightning's `trainer` property raises when there is none."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def compile_decoder_layers(model: PreTrainedModel, *, data_parallel: bool) -> None:
    """`torch.compile` each decoder layer of `model` into one graph (the module's `compile_layers`), and what
    activation checkpointing recomputes in backward too.

    transformers >= 5.2x checkpoints a layer from inside its `forward` (`GradientCheckpointingLayer` wraps `forward`,
    no longer `__call__`), so a compiled layer breaks its graph at the checkpoint, and the recomputation in backward,
    called by autograd outside any compiled code, ran uncompiled (and so did the layer's backward), drawing other
    dropout masks than the compiled forward had drawn: wrong LoRA gradients. There the
    function the checkpoint runs is compiled as well (`_compiling_checkpoint`), so that the forward, the
    recomputation and its backward all run compiled, as they do with the GPU image's transformers 5.17. (torch's
    own checkpoint, without offloading, is traced by dynamo together with the compiled call: nothing to do there.)

    Under DDP each layer's calls run with dynamo's DDPOptimizer switched off (for those calls only, where each
    graph is compiled), as torch documents for activation
    checkpointing (`torch._dynamo.config.optimize_ddp`, pytorch#104674; checked on torch 2.11-2.13). It splits a
    graph compiled inside DDP's forward at gradient-bucket boundaries, the first after 1 MB of parameters, so a
    7B layer's graph is split in its forward but not when checkpointing recomputes it in backward, outside
    DDP's forward: the recomputation saves other tensors than the forward did and torch.utils.checkpoint stops
    ("Recomputed values ... have different metadata": the README's DDP line with configs/7b.yaml on 2 H200s).
    The split only helps whole-model graphs overlap communication; per-layer graphs get that from DDP's hooks.
    """

    def compile_function(function: Callable) -> Callable:
        compiled = torch.compile(function, options=COMPILE_OPTIONS)
        return _without_ddp_optimizer(compiled) if data_parallel else compiled

    compiled_forwards: dict[Callable, Callable] = {}  # what the checkpoint runs, compiled once per function
    inside_forward = "__call__" not in vars(GradientCheckpointingLayer)  # transformers >= 5.2x
    for layer in cast(torch.nn.ModuleList, model.get_decoder().layers):
        if data_parallel:
            layer.forward = compile_function(layer.forward)
        else:
            layer.compile(options=COMPILE_OPTIONS)
        if inside_forward and getattr(layer, "_gradient_checkpointing_func", None) is offloaded_checkpoint:
            # torch types a module's attributes as tensors or modules (`Module.__setattr__`); this is a function
            layer._gradient_checkpointing_func = _compiling_checkpoint(  # type: ignore[assignment]
                offloaded_checkpoint, compile_function, compiled_forwards
            )


def _compiling_checkpoint(
    checkpoint: Callable, compile_function: Callable, compiled: dict[Callable, Callable]
) -> Callable:
    """`checkpoint` (a layer's checkpointing function) running a compiled copy of what transformers gives it,
    `partial(forward, layer, **kwargs)`: the function compiled once (kept in `compiled`, so that every layer of a
    class shares its graphs), the same layer and arguments. Only our offloaded checkpoint needs it: torch's own
    checkpoint is traced by dynamo together with the layer's compiled call, recomputation included."""

    # Run by the compiled layer's call, which breaks its graph at our checkpoint anyway: kept out of dynamo so that
    # `torch.compile` below really compiles (traced by dynamo, a `torch.compile` call inside a compiled region
    # returns the function uncompiled, and the recomputation ran eagerly whenever no graph break came first).
    @torch.compiler.disable
    def run(function: Callable, *args: Any) -> Any:
        if not isinstance(function, partial):
            raise TypeError(
                f"compile_layers: transformers called the checkpointing function with {function!r}, not the "
                "functools.partial of the layer's forward it gives in 5.2x; turn compile_layers off with this "
                "transformers version (or adapt module.compile_decoder_layers)"
            )
        if function.func not in compiled:
            compiled[function.func] = compile_function(function.func)
        return checkpoint(partial(compiled[function.func], *function.args, **function.keywords), *args)

    return run


def _without_ddp_optimizer(compiled: Callable) -> Callable:
    """`compiled`, called (and so compiled) with `torch._dynamo.config.optimize_ddp` off for its calls only."""

    def call(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(optimize_ddp=False):
            return compiled(*args, **kwargs)

    return call


def logits_transformed(config: Any) -> bool:
    """Whether a model transforms its logits (soft-capping, a logit scale): then `loss_on` takes transformers' own
    loss instead of running the output head on the labelled positions only."""
    return any(getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale"))


class ConstantWithWarmup(LambdaLR):
    """Linear warmup over `warmup_steps` optimizer steps, then the constant base learning rate."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> None:
        super().__init__(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0)

    @classmethod
    def for_run(cls, optimizer: torch.optim.Optimizer, warmup_ratio: float, total_steps: float) -> ConstantWithWarmup:
        """The module's default schedule: warmup over `warmup_ratio` of the run's `total_steps` optimizer steps (the
        trainer's estimate: infinite for a run without `max_steps` or `max_epochs`, which a warmup cannot use)."""
        if warmup_ratio > 0 and not math.isfinite(total_steps):
            raise ValueError("model.warmup_ratio needs a finite run: set trainer.max_steps or max_epochs")
        return cls(optimizer, warmup_steps=round(warmup_ratio * total_steps) if warmup_ratio else 0)


class QLoRAModule(LightningModule):
    """QLoRA fine-tuning of a causal LM: the training step, the optimizer and the model's life cycle.

    Args:
        base_model: hub id, local folder or `builtin:` name of the base model; the data's tokenizer is linked to it.
        quant: how the frozen base is stored (`QuantSpec`: NF4, double quantization, bf16 compute by default).
        lora: adapter rank, scale, dropout and targets (`LoraSpec`: the paper's r=64, alpha=16, all linear).
        gradient_checkpointing: recompute activations in backward (non-reentrant); the paper's setting.
        compile_layers: `torch.compile` each decoder layer into one graph (norms, rotary, SwiGLU fused; the same
            dropout masks as eager). Off by default (CPU, tests), on in the GPU configs; under FSDP2, not FSDP1.
        offload_activations: keep each checkpointed layer's input in pinned host memory until backward
            (`offload.offloaded_checkpoint`); needs gradient_checkpointing, not under FSDP. Off by default.
        offload_outputs: with offload_activations, the projections (name suffixes, e.g. `self_attn.o_proj`) whose
            forward output waits in pinned host memory too, so that the recomputation reuses it and skips their
            frozen matmul: less GEMM for more host copies (`LoraLinear.reuse_output_on_recompute`). Empty by default,
            as offloading is off by default; `configs/7b.yaml` keeps q/k/v/o's (7B at 16 × 512 on an H200: 12,675 →
            13,660 tokens/s, peak 6.2 → 6.5 GiB, BENCHMARKS.md).
        trust_remote_code: run the base folder's own modelling code; off unless the command line or config asks.
        optimizer: builds the optimizer from the LoRA parameters; the paper's paged AdamW 32-bit by default.
        scheduler: builds the LR scheduler; None gives a constant rate after `warmup_ratio` warmup.
        warmup_ratio: fraction of the run warming up linearly; 0.0, as the paper ran (HF's "constant" ignored 0.03).
        init_adapter: a PEFT LoRA adapter folder to start from (published adapters); None starts fresh (B = 0).
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
        offload_outputs: tuple[str, ...] = (),
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
        quant, lora = specs_from_plain(quant, lora)  # `load_from_checkpoint` passes the plain dicts saved
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "trust_remote_code"])
        self.base_model, self.quant, self.lora = base_model, quant, lora
        self.gradient_checkpointing, self.trust_remote_code = gradient_checkpointing, trust_remote_code
        self.compile_layers, self.offload_activations = compile_layers, offload_activations
        self.offload_outputs = tuple(offload_outputs)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.warmup_ratio, self.init_adapter = warmup_ratio, init_adapter
        self.predict_max_new_tokens = predict_max_new_tokens
        self.model: Any = None  # the PreTrainedModel, built by `configure_model`
        self.base_fingerprint: str | None = None  # of the loaded base's weights (`model.weights_fingerprint`)
        self._tokenizer: Any = None  # a PreTrainedTokenizerBase once loaded
        self._adapter_config: dict[str, Any] | None = None
        self.strict_loading = False  # checkpoints hold the adapters only, not the frozen base
        self._held_out = LabelledLossSum()  # this validation or test epoch's losses

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs) -> QLoRAModule:
        """Lightning's `load_from_checkpoint`, safe with a checkpoint from anyone (`resume.load_safely`: read with
        `weights_only=True`; `trust_remote_code=` is this call's argument only, False unless passed)."""
        return load_safely(super().load_from_checkpoint, checkpoint_path, *args, **kwargs)

    def configure_callbacks(self) -> list:
        """What every trainer needs unless it has it: a `RunLock` taking the log folder now, the first hook of a `fit`
        (run_lock.py), the `NonFiniteGuard` and the `TrainingRngStream` (callbacks.py)."""
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector, undeclared
        present = {type(c) for c in callbacks}
        every_run = (RunLock.of(self.trainer), NonFiniteGuard(), TrainingRngStream())
        return [c for c in every_run if type(c) not in present]

    def setup(self, stage: str) -> None:
        """Refuse a precision the layers cannot run, and a `fit` that trains nothing, before the model loads."""
        check_precision(self.trainer.precision, self.quant.compute_dtype)
        if stage == "fit":
            check_trains_something(self.trainer, self.optimizer_factory)

    def configure_model(self) -> None:
        """Load the 4-bit model with fresh (or `init_adapter`) LoRA on this rank's device; idempotent."""
        if self.model is not None:
            return
        strategy = getattr(attached_trainer(self), "strategy", None)
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
            offload_outputs=self.offload_outputs,
            with_tokenizer=False,
            trust_remote_code=self.trust_remote_code,
        )
        self.model, self.base_fingerprint = loaded.model, loaded.fingerprint
        self._adapter_config = adapter_config(self.model, base_model=self.base_model)  # names before FSDP wraps
        if sharding is not None:
            sharding.load_units_with(loaded.materialize)
        if self.compile_layers:
            compile_decoder_layers(self.model, data_parallel=isinstance(strategy, DDPStrategy))
        self._head_on_labelled_only = not logits_transformed(self.model.config)

    @property
    def tokenizer(self):
        """The base model's tokenizer, loaded on first use (training itself needs only the data module's)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base_model, trust_remote_code=self.trust_remote_code)
        return self._tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Lightning's transfer, except for the `HOST_ENTRIES`, which stay where the loader made them."""
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        rest = {key: value for key, value in batch.items() if key not in HOST_ENTRIES}
        moved = super().transfer_batch_to_device(rest, device, dataloader_idx)
        return {**moved, **{key: batch[key] for key in HOST_ENTRIES if key in batch}}

    def loss_on(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean causal-LM loss over the labelled (target) tokens, and their count, for a padded or a packed batch
        (`padding_free`, attending per example through `attention.varlen_attention`): the same loss. The output head
        runs on the labelled positions only (three quarters less head work and fp32 logits at source 384 / target
        128), unless the model transforms its logits (`logits_transformed`: transformers' own loss). `labels` may
        be on the host (as `transfer_batch_to_device` leaves them) or with the inputs."""
        device, labels = batch["input_ids"].device, batch["labels"]
        count = (labels[:, 1:] != -100).sum().to(device, non_blocking=True)
        inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
        if not self._head_on_labelled_only:
            return self.model(**inputs, labels=labels.to(device, non_blocking=True), use_cache=False).loss, count
        rows, targets = (t.to(device, non_blocking=True) for t in labelled_positions(labels))
        hidden = self.model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden.flatten(0, 1).index_select(0, rows))
        return torch.nn.functional.cross_entropy(logits.float(), targets), count

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.loss_on(batch)
        # Averaged over ranks, as DDP averages their gradients: the loss of the whole global batch.
        sync = self.trainer.world_size > 1
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=examples_in(batch), sync_dist=sync)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._held_out = LabelledLossSum()

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._held_out.add(*self.loss_on(batch))

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        log_held_out(self, "val", self._held_out)

    def on_test_epoch_end(self) -> None:
        log_held_out(self, "test", self._held_out)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[dict[str, str]]:
        """Greedy answers to the batch's prompts, with references (`generate.answer_batch`)."""
        return answer_batch(self.model, self.tokenizer, batch, self.predict_max_new_tokens)

    def configure_optimizers(self):
        """The optimizer over the LoRA parameters, and its scheduler (`ConstantWithWarmup.for_run` unless the config
        names one) stepped at each optimizer step and logged as `train/lr`."""
        optimizer = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            total = self.trainer.estimated_stepping_batches
            scheduler = ConstantWithWarmup.for_run(optimizer, self.warmup_ratio, total)
        lr_scheduler = {"scheduler": scheduler, "interval": "step", "name": "train/lr"}
        return {"optimizer": optimizer, "lr_scheduler": lr_scheduler}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as configured (the paper: norm 0.3); a sharded strategy clips across the ranks' shards."""
        strategy = self.trainer.strategy
        if isinstance(strategy, (QLoRAFSDPStrategy, QLoRAFSDP2Strategy)) and gradient_clip_val:
            return strategy.clip_gradients(gradient_clip_val, gradient_clip_algorithm)
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def adapter_config(self) -> dict[str, Any]:
        """The PEFT adapter_config.json of this module's adapters (read from the layers when the model loaded)."""
        if self._adapter_config is None:
            raise RuntimeError("the model is not loaded yet: `configure_model` reads its adapters' config")
        return self._adapter_config

    def run_record(self) -> dict[str, Any]:
        """This run's identity as checkpoints record it (`resume.run_record`: base weights, LoRA and 4-bit specs)."""
        return run_record(self.base_model, self.base_fingerprint, self.lora, self.quant)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the adapters only, with what PEFT export and exact resume need (`resume.adapter_only_checkpoint`)."""
        adapter_only_checkpoint(checkpoint, is_adapter_key, self.adapter_config(), self.run_record())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Load the model, then refuse a checkpoint of another run (`resume.check_checkpoint_belongs`: the command
        line decides; other base weights, rank, scale, targets or 4-bit type are errors naming each difference)."""
        self.configure_model()
        validate_adapters = partial(validate, lora_layers(self.model), source="the checkpoint")
        check_checkpoint_belongs(checkpoint, self.run_record(), validate_adapters)

    def on_fit_start(self) -> None:
        """Warn when the trainer's saves are not atomic (`checkpoint.warn_unless_atomic`)."""
        warn_unless_atomic(self.trainer)

    def on_fit_end(self) -> None:
        """Export the final adapter as a PEFT folder `<log dir>/adapter` (`checkpoint.save_final_adapter`)."""
        save_final_adapter(self.trainer, self.adapter_config(), self.base_fingerprint)
