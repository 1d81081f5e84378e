"""FSDP2 for QLoRA: per-parameter sharding (`fully_shard`) with one shard unit per decoder layer.

FSDP1 (`fsdp.py`) flattens a unit into one buffer of one dtype with one gradient buffer, so the frozen 4-bit
weights need units of their own (eight per decoder layer: 1,761 all-gathers a 70B step). FSDP2 shards every
parameter on its own as a DTensor and gives gradients only to parameters that require them, so a decoder layer
is one unit: its LoRA factors and norms are trained, its frozen weights get no gradient and are gathered once in
the forward and once in the backward.

How the frozen NF4 weights are sharded (checked with torch 2.13): each frozen 4-bit linear becomes one plain
`uint8` parameter holding the packed weight and its whole quantization state (`lora.PackedQuantWeight`),
sharded on its first dimension like any parameter and dequantized by the layer after the all-gather. Chosen
over the two other ways because it is correct, simple and as fast:
- bitsandbytes' `Params4bit` as it is: FSDP2 shards its bytes into a plain DTensor and drops the quantization
  state, which then stays whole on every rank (absmax: 1/32 of the weights' bytes, replicated);
- a tensor subclass with FSDP2's `fsdp_pre_all_gather` / `fsdp_post_all_gather` extension (as torchao's
  NF4Tensor for torchtune): the same bytes on the wire, but every aten op FSDP2 applies to a sharded parameter
  (chunk, split, view, copy, padding, `to`) must be implemented by the subclass, and kept in step with torch;
- one byte blob per linear is one all-gather input with its constants, is never cast by mixed precision (FSDP2
  and `.to(bf16)` leave integer tensors alone), and FSDP2 gathers a unit of mixed dtypes (bf16 LoRA factors
  and norms, uint8 blobs) as bytes itself.

The rest of the set-up, in `QLoRAFSDP2Strategy` (Lightning's `ModelParallelStrategy`, data parallel over every
process):
- loading never holds the whole model: the module leaves it on the meta device; each decoder layer is loaded
  (`model.ModuleMaterializer`), packed and sharded before the next is loaded, the embeddings and head last;
- the root unit is the LightningModule (its steps call the decoder and the head apart), run through
  Lightning's forward redirection so that FSDP2's root hooks see every step;
- the optimizer steps this rank's shards as plain tensors (`_LocalShards`), so bitsandbytes' paged AdamW (the
  recipe's), which knows no DTensor, works unchanged; gradients are clipped by their global norm;
- compiled decoder layers (`compile_layers`) run: each is compiled before it is sharded, and FSDP2's hooks run
  eagerly around its graph; offloaded activations are refused (`check_settings`);
- checkpoints hold the adapters and the whole optimizer state, gathered on rank 0 and keyed by parameter
  order as under FSDP1 and on one device, so a run resumes on any number of processes (and across the two
  FSDP strategies); loading takes each rank's rows of them.
`configs/fsdp2.yaml` sets all of this up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from itertools import pairwise
from typing import Any, cast

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer
from transformers.modeling_layers import GradientCheckpointingLayer

from .adapters import is_adapter_key, read_checkpoint_adapters
from .fsdp import check_optimizer
from .lora import FrozenLinear4bit, lora_layers


def local_gradients(module: nn.Module) -> list[torch.Tensor]:
    """This rank's part of each gradient of `module`: under FSDP2 a gradient is a DTensor whose local shard is what
    the rank holds (the non-finite guard checks those, then agrees across ranks); other gradients as they are."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return [g.to_local() if isinstance(g, DTensor) else g for g in grads]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of any transformers model (the modules transformers marks as
    `GradientCheckpointingLayer`), outermost first: FSDP2's shard units."""
    layers: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(_inside(module, layer) for layer in layers):
            layers.append(module)
    return layers


def _inside(module: nn.Module, layer: nn.Module) -> bool:
    return any(m is module for m in layer.modules())


def shard_model(
    root: nn.Module,
    materialize: Callable[[nn.Module], None],
    mesh: DeviceMesh | None = None,
    *,
    cpu_offload: bool = False,
    forward_prefetch: bool = True,
) -> None:
    """Load and shard `root` (left on the meta device) one decoder layer at a time: each layer's modules get
    their tensors from `materialize`, its frozen 4-bit linears are packed (`FrozenLinear4bit.pack_for_sharding`)
    and the layer becomes a shard unit; then the rest (embeddings, final norm, head) joins `root`'s unit.

    `root` is the module whose forward runs every step. `cpu_offload` keeps the shards (and the optimizer's
    work) in host memory; `forward_prefetch` starts the next layer's all-gather as this one's forward starts.
    """
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    units = []
    for layer in decoder_layers(root):
        _load_and_pack(layer, materialize)
        units.append(fully_shard(layer, mesh=mesh, offload_policy=offload))
    _load_and_pack(root, materialize)
    fully_shard(root, mesh=mesh, offload_policy=offload)
    if forward_prefetch:
        for unit, after in pairwise(units):
            unit.set_modules_to_forward_prefetch([after])


def _load_and_pack(module: nn.Module, materialize: Callable[[nn.Module], None]) -> None:
    for m in module.modules():
        if not isinstance(m, FSDPModule) or m is module:
            materialize(m)
    for m in module.modules():
        if isinstance(m, FrozenLinear4bit) and m.packing is None and not isinstance(m.weight, DTensor):
            m.pack_for_sharding()


def _on_mesh(local: torch.Tensor, like: DTensor) -> torch.Tensor:
    """`local` (a shard shaped as `like`'s) on the device `like`'s collectives run on (the CPU offload keeps
    shards in host memory; NCCL gathers only GPU tensors)."""
    return local.to(like.device_mesh.device_type)


def gather_shard(local: torch.Tensor, like: DTensor) -> torch.Tensor:
    """The whole tensor of which `local` is this rank's shard, sharded as parameter `like`. A collective."""
    whole = DTensor.from_local(
        _on_mesh(local, like),
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )
    return whole.full_tensor()


def shard_of(whole: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's rows of `whole`, sharded as parameter `like` (no communication: every rank holds `whole`)."""
    sharded = distribute_tensor(_on_mesh(whole, like), like.device_mesh, like.placements, src_data_rank=None)
    return sharded.to_local()


def _adapters(model: nn.Module) -> Iterator[tuple[str, DTensor]]:
    """(key, parameter) of the LoRA tensors, in the same order on every rank; each a DTensor once sharded."""
    for key, p in model.named_parameters():
        if is_adapter_key(key):
            if not isinstance(p, DTensor):
                raise TypeError(f"{key}: expected a parameter sharded by `shard_model`, got a {type(p).__name__}")
            yield key, p


def gather_adapters(model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a sharded model on rank 0 (CPU), gathered one at a time; `{}` on other ranks.
    A collective: every rank must call it."""
    state: dict[str, torch.Tensor] = {}
    for key, p in _adapters(model):
        whole = gather_shard(p.to_local(), p)
        if rank == 0:
            state[key] = whole.to("cpu", copy=True)
    return state


@torch.no_grad()
def load_adapters(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy LoRA tensors (whole, on every rank, checked by `adapters.validate`) into a sharded model's shards."""
    for key, p in _adapters(model):
        local = p.to_local()
        local.copy_(shard_of(state[key].to(local.dtype), p))


class _LocalShards:
    """The optimizer's view of sharded parameters: for each DTensor parameter, a plain parameter sharing this
    rank's shard, whose `.grad` is this rank's shard of the gradient (bound after each backward).

    So any optimizer steps the shards, bitsandbytes' included (it knows no DTensor), and its state holds this
    rank's rows of each moment, as FSDP1's flat shards gave it."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.pairs: list[tuple[nn.Parameter, DTensor]] = []  # (the optimizer's plain parameter, the model's)
        for group in optimizer.param_groups:
            plain = [self._plain(p) for p in group["params"]]
            group["params"] = plain
        self.optimizer = optimizer

    def _plain(self, p: nn.Parameter) -> nn.Parameter:
        if not isinstance(p, DTensor):
            raise TypeError(f"expected the sharded model's parameters in the optimizer, got a {type(p).__name__}")
        local = nn.Parameter(p.to_local(), requires_grad=False)
        self.pairs.append((local, p))
        return local

    @torch.no_grad()
    def bind_grads(self) -> None:
        """Give each plain parameter this rank's shard of its gradient (the same memory, no copy), and the
        shard itself as it is now (FSDP2 may have re-padded it at its first forward)."""
        for local, p in self.pairs:
            local.data = p.to_local()
            local.grad = None if p.grad is None else cast(DTensor, p.grad).to_local()  # a DTensor's is one too

    @torch.no_grad()
    def drop_grads(self) -> None:
        """Free the model's gradients after the step (the optimizer only zeroes its own plain views)."""
        for _, p in self.pairs:
            p.grad = None


class QLoRAFSDP2Strategy(ModelParallelStrategy):
    """FSDP2 for QLoRA on Lightning's `ModelParallelStrategy` (data parallel over every process, no tensor
    parallelism): one shard unit per decoder layer, the frozen 4-bit weights packed and sharded per parameter,
    adapter-only single-file checkpoints with the whole optimizer state.

    Arguments:
        cpu_offload: keep the shards, gradients and optimizer state in host memory (FSDP2's `CPUOffloadPolicy`):
            for GPUs too small for their shards; slower steps. Off by default, as in `QLoRAFSDPStrategy`.
        forward_prefetch: all-gather the next decoder layer as this one's forward starts (FSDP2 prefetches in
            the backward by itself). On by default: it overlaps the gathers with compute, as under FSDP1.
        process_group_backend, timeout: as `ModelParallelStrategy` (its data- and tensor-parallel sizes are fixed:
            every process is a data-parallel rank; its checkpoints are single files).
    """

    def __init__(
        self,
        cpu_offload: bool = False,
        forward_prefetch: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=False, process_group_backend=process_group_backend, timeout=timeout
        )
        self.cpu_offload, self.forward_prefetch = cpu_offload, forward_prefetch
        self._materialize: Callable[[nn.Module], None] | None = None
        self._shards: list[_LocalShards] = []

    def check_settings(self, *, compile_layers: bool, offload_activations: bool) -> QLoRAFSDP2Strategy:
        """This strategy, once the module's settings are checked to run under it (before the model loads):
        offloaded activations are refused. Compiled decoder layers run: each is compiled before it is sharded,
        and FSDP2's hooks run eagerly around its graph (torch 2.13 marks them `torch._dynamo.disable`)."""
        if offload_activations:
            raise ValueError(
                "model.offload_activations is not supported under FSDP2 (its checkpointing function runs inside "
                "the shard units): set it to false, as configs/fsdp2.yaml does"
            )
        return self

    def setup_environment(self) -> None:
        """Lightning's set-up with a one-dimensional mesh: every process is a data-parallel rank."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def load_units_with(self, materialize: Callable[[nn.Module], None]) -> None:
        """Load the model (left on the meta device by `QLoRAModule.configure_model`) with `materialize` one
        decoder layer at a time as `setup` shards it, so no rank ever holds the whole model."""
        self._materialize = materialize

    @property
    def _module(self) -> LightningModule:
        """The LightningModule (the root `shard_model` shards), which the trainer connects before any hook here."""
        module = self.lightning_module
        if module is None:
            raise RuntimeError("QLoRAFSDP2Strategy has no LightningModule: a trainer connects it before set-up")
        return module

    def setup(self, trainer) -> None:
        """Shard the module's model (`shard_model`, the LightningModule as root), then Lightning's set-up."""
        module = self._module
        if self._materialize is None:
            raise RuntimeError("QLoRAFSDP2Strategy shards a QLoRAModule: its configure_model did not run")
        if not isinstance(module, FSDPModule):
            shard_model(
                module,
                self._materialize,
                self.device_mesh["data_parallel"],
                cpu_offload=self.cpu_offload,
                forward_prefetch=self.forward_prefetch,
            )
        super().setup(trainer)

    def setup_optimizers(self, trainer) -> None:
        """Lightning's set-up, `fsdp.check_optimizer` on each (what cannot be checkpointed fails before the first
        step), then the optimizers take this rank's shards as plain tensors (`_LocalShards`)."""
        super().setup_optimizers(trainer)
        for optimizer in self.optimizers:
            check_optimizer(optimizer)
        self._shards = [_LocalShards(optimizer) for optimizer in self.optimizers]

    def model_to_device(self) -> None:
        """Nothing to move: `shard_model` put every shard where it belongs (on the GPU, or in host memory with
        `cpu_offload`), and Lightning's `.to(device)` would undo the offload."""

    # ------------------------------------------------------------------------------------------ steps
    def _through_root(self, step: str, *args: Any, **kwargs: Any) -> Any:
        """Run the LightningModule's `step` as its forward, so that FSDP2's root hooks (lazy set-up, gathering
        the root's parameters, the backward's final wait) run around every step."""
        model = self.model
        assert model is not None, "Lightning's set-up gives the strategy its model before the first step"
        return self._forward_redirection(model, self._module, step, *args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.train_step_context():
            return self._through_root("training_step", *args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return self._through_root("validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return self._through_root("test_step", *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self._through_root("predict_step", *args, **kwargs)

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        """After each backward (FSDP2 has reduce-scattered the gradients): hand them to the optimizers."""
        for shards in self._shards:
            shards.bind_grads()

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        """Lightning's step, then the model's gradients are dropped (the next backward starts a new sum)."""
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        for shards in self._shards:
            if shards.optimizer is getattr(optimizer, "_optimizer", optimizer):
                shards.drop_grads()
        return out

    def clip_gradients(self, max_norm: float, algorithm: str | None) -> None:
        """Clip the gradients to their global norm, as `torch.nn.utils.clip_grad_norm_` on the whole model: each
        rank holds shards of them, so the squared norms of the shards are summed over the ranks (on the GPU: with
        `cpu_offload` the shards are in host memory, which NCCL does not reduce)."""
        if algorithm not in (None, "norm"):
            raise ValueError(f"under FSDP2 only norm clipping is supported, got {algorithm!r}")
        grads = [local.grad for shards in self._shards for local, _ in shards.pairs if local.grad is not None]
        squares = sum(
            (g.float().square().sum().to(self.root_device) for g in grads), torch.zeros((), device=self.root_device)
        )
        norm = self.reduce(squares, reduce_op="sum").sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.device, g.dtype))

    # ------------------------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The adapters only, gathered on rank 0 (Lightning's would gather every 4-bit weight too)."""
        return gather_adapters(self._module, self.global_rank)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The whole optimizer state on rank 0 (`{}` elsewhere), keyed by the optimizer's parameter order as a
        plain optimizer's: each state tensor shaped as its parameter's shard is gathered whole. A collective.

        torch's `state_dict` is taken, not bitsandbytes' (which nests its moments), as `QLoRAFSDPStrategy` does."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        shards = next(s for s in self._shards if s.optimizer is optimizer)
        state = Optimizer.state_dict(optimizer)  # its entries are the optimizer's own dicts: copied, not changed
        whole = {}
        for index, entry in state["state"].items():
            local, p = shards.pairs[index]
            whole[index] = {
                name: gather_shard(value, p).to("cpu", copy=True)
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == local.shape
                else value
                for name, value in sorted(entry.items())
            }
        return {"state": whole, "param_groups": state["param_groups"]} if self.global_rank == 0 else {}

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load an adapter-only checkpoint into the shards, and its optimizer state when fitting (every rank
        reads the file and takes its own rows)."""
        path = self.broadcast(checkpoint_path)
        state, checkpoint = read_checkpoint_adapters(path, lora_layers(self._module))
        load_adapters(self._module, state)
        states = checkpoint.get("optimizer_states")
        if states is not None and self._module.trainer.state.fn == TrainerFn.FITTING:
            for shards, saved in zip(self._shards, states, strict=True):
                shards.optimizer.load_state_dict(_local_optimizer_state(saved, shards))
        return checkpoint


def _local_optimizer_state(saved: dict[str, Any], shards: _LocalShards) -> dict[str, Any]:
    """A whole optimizer state (`QLoRAFSDP2Strategy.optimizer_state`) cut to this rank's rows of each tensor
    shaped as its parameter."""
    if len(saved["state"]) > len(shards.pairs):
        raise ValueError(
            f"the checkpoint's optimizer holds state for {len(saved['state'])} parameters, this run's "
            f"{len(shards.pairs)}: a checkpoint of another model or adapter targets"
        )
    state = {}
    for index, entry in saved["state"].items():
        _, p = shards.pairs[index]
        state[index] = {
            name: shard_of(value, p) if isinstance(value, torch.Tensor) and value.shape == p.shape else value
            for name, value in entry.items()
        }
    return {"state": state, "param_groups": saved["param_groups"]}
