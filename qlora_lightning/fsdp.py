"""FSDP for QLoRA: shard units that keep the frozen 4-bit weights apart, and adapter-only checkpoints.

FSDP (FSDP1 through Lightning's `FSDPStrategy`, `use_orig_params=True`) flattens each shard unit's
parameters into one buffer of a single dtype, shards it across ranks, and gives every unit that holds a
trainable parameter a gradient buffer as large as the unit. So:
- each frozen base linear (`FrozenLinear`) is its own unit, with no gradient buffer, and each decoder
  layer a unit around it holding the LoRA factors and norms: gradients cost the adapters' size, not the
  model's (`decoder_layer_policy`);
- the packed NF4 bytes are stored in the compute dtype (`quant.quant_storage: bfloat16`): FSDP's mixed
  precision casts parameters to bf16, which must be a no-op on them (`check_shardable`);
- loading never holds the whole model on one rank: `QLoRAModule` leaves it on the meta device and FSDP
  calls the loader (`model.ModuleMaterializer`) on each unit's modules just before sharding that unit;
- checkpoints hold the adapters only: `QLoRAFSDPStrategy` gathers those one unit at a time onto rank 0 and
  loads them back into the shards, where Lightning's full state dict would gather and expect every weight;
  the optimizer state is gathered whole (bitsandbytes' paged AdamW included), so a run resumes on any
  number of GPUs;
- the next unit's all-gather starts during this one's forward (`forward_prefetch`): with eight units per
  decoder layer the all-gathers are a third of a 70B step's GPU time, and overlapping them in the forward
  as well as the backward made it 5 % faster (BENCHMARKS.md).
`configs/fsdp.yaml` sets all of this up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, OptimStateKeyType, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.optim import Optimizer
from transformers.modeling_layers import GradientCheckpointingLayer

from .adapters import is_adapter_key, read_checkpoint_adapters
from .lora import FrozenLinear, LoraLinear, lora_layers
from .specs import QuantSpec

if TYPE_CHECKING:
    from .fsdp2 import QLoRAFSDP2Strategy


def decoder_layer_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy: every decoder layer of any transformers model (they are marked by
    `GradientCheckpointingLayer`) and, inside it, every frozen base linear is a shard unit."""
    return recurse or isinstance(module, (GradientCheckpointingLayer, FrozenLinear))


def check_shardable(quant: QuantSpec) -> None:
    """Raise unless the packed 4-bit weights are stored in the compute dtype, as FSDP's buffers need."""
    if quant.quantize != "none" and quant.quant_storage != quant.compute_dtype:
        raise ValueError(
            f"FSDP casts shard buffers to the compute dtype: set model.quant.quant_storage to "
            f"{quant.compute_dtype!r} (the compute dtype), not {quant.quant_storage!r} (see configs/fsdp.yaml)"
        )


def check_optimizer(optimizer: Optimizer) -> None:
    """Refuse an optimizer whose state FSDP cannot gather into a checkpoint: 8-bit states (block-wise constants
    beside the tensors) and `states_on_host` (host tensors, which the GPUs' collectives cannot gather; FSDP already
    shards the states over the ranks, and `cpu_offload: true` keeps them in host memory)."""
    name = type(optimizer).__name__
    if getattr(getattr(optimizer, "args", None), "optim_bits", 32) != 32:
        raise ValueError(
            f"{name}: 8-bit optimizer states cannot be gathered by FSDP; use a 32-bit optimizer (the paper's paged "
            "AdamW 32-bit) under FSDP"
        )
    if getattr(optimizer, "states_on_host", False):
        raise ValueError(
            f"{name}(states_on_host=True) is not supported under FSDP: its host states cannot be gathered into a "
            "checkpoint. FSDP shards the optimizer states over the GPUs already: set "
            "`--model.optimizer.init_args.states_on_host false` (70b.yaml turns it on for one GPU); "
            "`cpu_offload: true` in the strategy keeps the shards in host memory"
        )


def unwrapped_name(name: str) -> str:
    """A module or parameter name as in the unwrapped model: FSDP inserts `_fsdp_wrapped_module.` levels. The one
    place that knows FSDP's naming (checked on torch 2.13)."""
    return name.replace("_fsdp_wrapped_module.", "")


def unwrapped_lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """`lora.lora_layers` of a model FSDP wrapped, by their names in the unwrapped model."""
    return {unwrapped_name(n): m for n, m in lora_layers(model).items()}


def _units(model: nn.Module) -> Iterator[tuple[str, FSDP]]:
    """(name without FSDP's wrapper levels, unit) of every FSDP unit, in the same order on every rank."""
    for name, module in model.named_modules():
        if isinstance(module, FSDP):
            yield (unwrapped_name(name + ".") if name else ""), module


def _init_root(model: FSDP) -> None:
    """Let FSDP set up the whole tree from its root (first use), which it must before any nested unit is
    used on its own: summoning the root's own parameters (embeddings, head) does that and nothing else."""
    with FSDP.summon_full_params(model, recurse=False, writeback=False):
        pass


def _owned_adapters(prefix: str, unit: FSDP) -> Iterator[tuple[str, nn.Parameter]]:
    """(full key, parameter) of the LoRA tensors a unit holds itself (not those of units nested in it)."""
    stack = [("", unit.module)]
    while stack:
        path, module = stack.pop()
        for name, p in module.named_parameters(recurse=False):
            key = unwrapped_name(prefix + path + name)
            if is_adapter_key(key):
                yield key, p
        stack += [(f"{path}{n}.", c) for n, c in module.named_children() if not isinstance(c, FSDP)]


def _adapter_units(model: FSDP) -> Iterator[tuple[str, FSDP]]:
    """(key prefix, unit) of the units that hold LoRA tensors themselves, once FSDP has set up the root."""
    _init_root(model)
    for prefix, unit in _units(model):
        if any(True for _ in _owned_adapters(prefix, unit)):
            yield prefix, unit


def gather_adapters(model: FSDP, rank: int) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a FSDP model on rank 0 (CPU), gathered one unit at a time; `{}` on other ranks.

    A collective: every rank must call it."""
    state: dict[str, torch.Tensor] = {}
    for prefix, unit in _adapter_units(model):
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True):
            if rank == 0:
                state.update((k, p.detach().to("cpu", copy=True)) for k, p in _owned_adapters(prefix, unit))
    return state


@torch.no_grad()
def load_adapters(model: FSDP, state: dict[str, torch.Tensor]) -> None:
    """Copy LoRA tensors (full, on every rank, checked by `adapters.validate`) into a FSDP model's shards, one
    unit at a time. A collective."""
    for prefix, unit in _adapter_units(model):
        with FSDP.summon_full_params(unit, recurse=False, writeback=True):
            for key, p in _owned_adapters(prefix, unit):
                p.copy_(state[key])


def _full_state_dict_type(model: nn.Module, rank0_only: bool, device: torch.device):
    """FSDP's full (unsharded) state-dict mode for the optimizer state, offloaded to the CPU from a GPU.

    Not "offloaded" when the ranks compute on the CPU: FSDP gathers every state of a unit (Adam's two moments)
    into one reused buffer and keeps views of it, which it copies only by that offload, or by a clone when
    there is none; on the CPU the offload (`.cpu()`) is no copy, so both moments became the second one (seen
    with torch 2.13 on gloo: state1 == state2 in every checkpoint, NaN after the resumed step).
    """
    offload = device.type != "cpu"
    return FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
    )


class QLoRAFSDPStrategy(FSDPStrategy):
    """Lightning's `FSDPStrategy` with QLoRA's shard units and adapter-only checkpoints.

    Arguments as `FSDPStrategy`, whose `auto_wrap_policy` defaults to `decoder_layer_policy`, and:
        forward_prefetch: all-gather the next shard unit during this one's forward (FSDP's option, named here so
            that a config can set it). On by default: the same losses and gradients, 5 % faster at 70B on 2 GPUs.
    Checkpoints are single files (`state_dict_type="full"`, so `AtomicCheckpointIO` writes them and their PEFT
    folders) with the adapters gathered on rank 0 and the optimizer state in the same full form, so they resume
    on any number of devices.
    """

    def __init__(self, *args: Any, forward_prefetch: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("auto_wrap_policy", decoder_layer_policy)
        kwargs["forward_prefetch"] = forward_prefetch
        if kwargs.setdefault("state_dict_type", "full") != "full":
            raise ValueError(
                "QLoRAFSDPStrategy writes adapter-only single-file checkpoints: state_dict_type must be 'full'"
            )
        super().__init__(*args, **kwargs)

    @property
    def _root(self) -> FSDP:
        """The model as Lightning's set-up wrapped it: the root FSDP unit (`Strategy.model` is typed loosely)."""
        return cast(FSDP, self.model)

    def clip_gradients(self, max_norm: float, algorithm: str | None) -> None:
        """Clip the gradients to a global norm: each rank holds a shard of them, so FSDP's own `clip_grad_norm_`
        takes the norm across ranks (Lightning's FSDP precision plugin refuses norm clipping)."""
        if algorithm not in (None, "norm"):
            raise ValueError(f"under FSDP only norm clipping is supported, got {algorithm!r}")
        self._root.clip_grad_norm_(max_norm)

    def setup_optimizers(self, trainer) -> None:
        """Lightning's set-up, then `check_optimizer` on each: a setting FSDP cannot checkpoint fails before the
        first step, not at the first checkpoint."""
        super().setup_optimizers(trainer)
        for optimizer in self.optimizers:
            check_optimizer(optimizer)

    def load_units_with(self, materialize: Callable[[nn.Module], None]) -> None:
        """Have FSDP give each shard unit's modules their tensors with `materialize` just before sharding that
        unit (FSDP's `param_init_fn`), for a model left on the meta device: `QLoRAModule.configure_model` passes
        its loader (`model.ModuleMaterializer`), so no rank ever holds the whole model."""
        self.kwargs["param_init_fn"] = materialize

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The full optimizer state on rank 0, keyed by the optimizer's parameter order (as a plain optimizer's
        `state_dict`, so it loads under any strategy and number of ranks), bitsandbytes' too.

        bitsandbytes' `state_dict` hides its moments from FSDP in a nested dict, which FSDP then fails to
        merge across ranks; torch's own `state_dict` of the same optimizer shows them as the per-shard
        tensors FSDP knows how to gather (`check_optimizer` refused at set-up what it cannot).
        """
        with _full_state_dict_type(self._root, rank0_only=True, device=self.root_device):
            state = FSDP.optim_state_dict(self._root, optimizer, optim_state_dict=Optimizer.state_dict(optimizer))
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self._root, optim=optimizer)
        return state

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The adapters only, gathered on rank 0 (Lightning's would gather every 4-bit weight too)."""
        return gather_adapters(self._root, self.global_rank)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load an adapter-only checkpoint into the shards, and its optimizer state when fitting."""
        path = self.broadcast(checkpoint_path)
        state, checkpoint = read_checkpoint_adapters(path, unwrapped_lora_layers(self._root))
        load_adapters(self._root, state)
        states = checkpoint.get("optimizer_states")
        module = self.lightning_module
        if states is not None and module is not None and module.trainer.state.fn == TrainerFn.FITTING:
            # Saved by rank 0 keyed by parameter order; every rank takes its own shard of it.
            with _full_state_dict_type(self._root, rank0_only=False, device=self.root_device):
                for optimizer, state in zip(self.optimizers, states, strict=True):
                    if isinstance(next(iter(state["state"]), None), int):
                        state = FSDP.rekey_optim_state_dict(
                            state, OptimStateKeyType.PARAM_NAME, self._root, optim=optimizer
                        )
                    optimizer.load_state_dict(FSDP.optim_state_dict_to_load(self._root, optimizer, state))
        return checkpoint


def sharding_strategy(
    strategy: Strategy | None, quant: QuantSpec, *, compile_layers: bool, offload_activations: bool
) -> QLoRAFSDPStrategy | QLoRAFSDP2Strategy | None:
    """`strategy` when it shards the model (None when it does not), once the module's settings are checked to be
    shardable: Lightning's own `FSDPStrategy` and `ModelParallelStrategy`, and under FSDP1 packed weights in another
    dtype than the compute dtype, compiled layers and offloaded activations, are refused before the model loads."""
    from .fsdp2 import QLoRAFSDP2Strategy  # fsdp2 builds on this module

    if isinstance(strategy, QLoRAFSDP2Strategy):
        return strategy.check_settings(compile_layers=compile_layers, offload_activations=offload_activations)
    if isinstance(strategy, ModelParallelStrategy):
        raise ValueError(
            "use qlora_lightning.fsdp2.QLoRAFSDP2Strategy for FSDP2 (configs/fsdp2.yaml): Lightning's own "
            "ModelParallelStrategy leaves sharding to the module, and QLoRAModule's model would train unsharded"
        )
    if not isinstance(strategy, FSDPStrategy):
        return None
    if not isinstance(strategy, QLoRAFSDPStrategy):
        raise ValueError(
            "use qlora_lightning.fsdp.QLoRAFSDPStrategy for FSDP (configs/fsdp.yaml): Lightning's own "
            "FSDPStrategy gathers every 4-bit weight into checkpoints and cannot load adapter-only ones"
        )
    check_shardable(quant)
    if compile_layers or offload_activations:
        raise ValueError(
            "model.compile_layers and model.offload_activations are not supported under FSDP yet (FSDP's "
            "shard units run inside the layers): set both to false, as configs/fsdp.yaml does"
        )
    return strategy
