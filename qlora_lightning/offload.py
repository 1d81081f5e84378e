"""Offloaded activation checkpointing: each checkpointed layer's input waits in pinned host memory, not on the GPU.

With per-layer activation checkpointing (the paper's setting) what stays on the GPU between a layer's forward
and its backward is that layer's input: one (tokens × hidden) tensor per decoder layer, 2 GiB at 7B for 16 × 512
tokens. `offloaded_checkpoint` keeps it in pinned host memory instead:
- forward runs the layer without saving anything for backward, and copies its input to the host on a side
  stream, overlapped with the following layers' compute;
- backward copies the input back, recomputes the layer with gradients and back-propagates through it; while a
  layer is back-propagated, the input of the layer before it is already on its way back (prefetched on the side
  stream), so the copies hide behind compute;
- the random state (LoRA dropout) of the forward is restored for the recomputation, so it draws the same masks;
- while the layer is recomputed, `recomputing()` is true: a LoRA layer whose output only joins the residual stream
  (`LoraLinear.skip_base_on_recompute`) then skips its frozen matmul, since nothing reads that output's value;
- a LoRA layer may also keep its forward output with the layer's input (`keep_output`, in pinned host memory like
  it; `LoraLinear.reuse_output_on_recompute`): the recomputation then takes that value back (`output_from_forward`)
  instead of redoing the frozen matmul, and the gradient flows through the LoRA path as before. Less GEMM for more
  host copies: `model.offload_outputs` chooses the projections.
On the CPU there is nothing to offload and the input simply stays where it is (the same arithmetic, which is what
the tests compare with plain checkpointing).

`model.enable_gradient_checkpointing(model, offload=True)` installs it; the LightningModule's
`offload_activations` option turns it on, and its `offload_outputs` names the projections whose outputs are kept.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["keep_output", "offloaded_checkpoint", "output_from_forward", "recomputing"]

#: True while `offloaded_checkpoint` recomputes a layer for its backward (`recomputing`)
_recomputing = False
#: What the offloaded layer now running (its forward, or its recomputation) keeps for backward; None outside one
_running: _LayerSaved | None = None


def recomputing() -> bool:
    """Whether a layer is being recomputed for its backward by `offloaded_checkpoint` (its output's values are then
    never read: only the graph it builds is). torch.compile guards on it, so a compiled layer gets its own graph for
    the recomputation."""
    return _recomputing


class _HostCopies:
    """What the offloaded layers of one forward pass keep (`_LayerSaved`), in layer order, each brought back ahead of
    need."""

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None
        # forward order; backward takes them from the end. Weak: a forward whose graph is dropped without a
        # backward (evaluation with gradients on) leaves nothing behind.
        self.pending: list[weakref.ref[_LayerSaved]] = []

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self.stream is None or self.stream.device != device:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    # Not traced by dynamo: a decoder layer compiled whole (`compile_layers`) has this checkpointing function inside
    # its compiled `forward` (transformers >= 5.2x checkpoints `forward`, not `__call__`), and dynamo turned
    # `weakref.ref(saved)` into `saved` itself, so backward found no weak reference to call (torch 2.13).
    @torch.compiler.disable
    def push(self, saved: _LayerSaved) -> None:
        self.pending = [ref for ref in self.pending if ref() is not None]
        self.pending.append(weakref.ref(saved))

    @torch.compiler.disable
    def pop_and_prefetch_previous(self, saved: _LayerSaved) -> None:
        """Forget `saved` and start bringing back what the layer before it saved (the next backward's)."""
        live = [ref() for ref in self.pending]
        if saved in live:
            index = live.index(saved)
            earlier = [s for s in live[:index] if s is not None]
            if earlier:
                earlier[-1].prefetch()
            del self.pending[index]


_copies = _HostCopies()


class _Offloaded:
    """One layer input: on the host (pinned) between forward and backward; back on its device when needed."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.device, self.requires_grad = tensor.device, tensor.requires_grad
        self.on_device: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        if tensor.device.type != "cuda":
            self.host = tensor.detach()  # nothing to offload to
            return
        stream = _copies.side_stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the input is written before it is copied
        with torch.cuda.stream(stream):
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
            self.host.copy_(tensor.detach(), non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused before the copy is done

    def prefetch(self) -> None:
        """Start copying the input back to its device on the side stream (no-op if started, or off the GPU)."""
        if self.on_device is not None or self.device.type != "cuda":
            return
        stream = _copies.side_stream(self.device)
        with torch.cuda.stream(stream):
            self.on_device = self.host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def fetch(self) -> torch.Tensor:
        """The input back on its device, ready for the compute stream."""
        if self.device.type != "cuda":
            return self.host
        self.prefetch()
        tensor, ready = self.on_device, self.ready
        assert tensor is not None and ready is not None, "prefetch set both"
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        tensor.record_stream(current)
        self.on_device = None
        del self.host  # the pinned copy is released
        return tensor


class _LayerSaved:
    """What one offloaded layer keeps for its backward: its input and the outputs its LoRA layers kept in forward
    (`keep_output`, in call order), all waiting on the host and brought back together."""

    def __init__(self, hidden_states: torch.Tensor) -> None:
        self.input = _Offloaded(hidden_states)
        self.outputs: list[_Offloaded] = []
        self.reused = 0  # outputs handed back by `output_from_forward` in this recomputation

    def prefetch(self) -> None:
        for saved in (self.input, *self.outputs):
            saved.prefetch()

    def next_output(self, like: torch.Tensor) -> torch.Tensor:
        """The next output kept in forward, back on its device; checked against the recomputed one's shape."""
        if self.reused == len(self.outputs):
            raise RuntimeError(
                f"the recomputation of a layer asked for output {self.reused + 1}, but its forward kept "
                f"{len(self.outputs)}: the layer ran other projections in forward than in backward"
            )
        output = self.outputs[self.reused].fetch()
        self.reused += 1
        if (output.shape, output.dtype) != (like.shape, like.dtype):
            raise RuntimeError(
                f"an output kept in forward is {tuple(output.shape)} {output.dtype}, "
                f"recomputed {tuple(like.shape)} {like.dtype}"
            )
        return output


@torch.library.custom_op("qlora_lightning::keep_output", mutates_args=("output",))
def _keep_output(output: torch.Tensor) -> None:
    """Inside an offloaded layer's forward, a copy of `output` joins what the layer keeps for backward; elsewhere
    (evaluation, the recomputation) nothing. An opaque op, so that a compiled layer calls it at run time (where
    `_running` says which layer runs). `output` is declared mutated, which it is not: a compiler drops an op with
    neither outputs nor mutations as dead code. The copy is taken on the compute stream before the op returns:
    Inductor reuses the buffer of a tensor whose last reader has run for a later kernel's output, and the host copy
    runs on a side stream, concurrently with those kernels."""
    if _running is not None and not _recomputing:
        _running.outputs.append(_Offloaded(output.detach().clone()))


@_keep_output.register_fake
def _(output: torch.Tensor) -> None:
    return None


def keep_output(output: torch.Tensor) -> None:
    """Keep `output` (a LoRA layer's, in an offloaded layer's forward, where gradients are off) for the
    recomputation, which takes it back with `output_from_forward`; a no-op outside an offloaded layer's forward."""
    _keep_output(output)


@torch.library.custom_op("qlora_lightning::output_from_forward", mutates_args=())
def _output_from_forward(recomputed: torch.Tensor) -> torch.Tensor:
    if _running is None or not _recomputing:
        raise RuntimeError("output_from_forward is for the recomputation of an offloaded layer only")
    return _running.next_output(like=recomputed)


@_output_from_forward.register_fake
def _(recomputed: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(recomputed)


_output_from_forward.register_autograd(lambda ctx, grad: grad)


def output_from_forward(recomputed: torch.Tensor) -> torch.Tensor:
    """In a recomputation, the value the layer's forward kept (`keep_output`, the calls taken in order) in place of
    `recomputed`, whose graph receives the gradient unchanged: `recomputed` need only carry the gradient's path
    (a LoRA layer passes its LoRA update alone, with the frozen matmul skipped)."""
    return _output_from_forward(recomputed)


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function: Callable, rng: dict[str, Any], hidden_states: torch.Tensor, *args: Any) -> Any:
        ctx.function, ctx.rng, ctx.args = function, rng, args
        ctx.saved = _LayerSaved(hidden_states)
        _copies.push(ctx.saved)
        with torch.no_grad(), _running_layer(ctx.saved):
            return function(hidden_states, *args)

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        saved = ctx.saved
        _copies.pop_and_prefetch_previous(saved)  # what the previous layer kept comes back while this one computes
        hidden_states = saved.input.fetch().detach().requires_grad_(saved.input.requires_grad)
        global _recomputing
        with torch.random.fork_rng(devices=ctx.rng["devices"], device_type=ctx.rng["device_type"]):
            _set_rng(ctx.rng)
            _recomputing = True
            try:
                with torch.enable_grad(), _running_layer(saved):
                    outputs = ctx.function(hidden_states, *ctx.args)
            finally:
                _recomputing = False
        if saved.reused != len(saved.outputs):
            raise RuntimeError(
                f"the recomputation of a layer took back {saved.reused} of the {len(saved.outputs)} outputs its "
                "forward kept: the layer ran other projections in forward than in backward"
            )
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [
            (o, g)
            for o, g in zip(outputs, grad_outputs, strict=True)
            if torch.is_tensor(o) and o.requires_grad and g is not None
        ]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, hidden_states.grad, *([None] * len(ctx.args)))


@contextmanager
def _running_layer(saved: _LayerSaved) -> Iterator[None]:
    global _running
    _running = saved
    try:
        yield
    finally:
        _running = None


def _get_rng(device: torch.device) -> dict[str, Any]:
    on_cuda = device.type == "cuda"
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if on_cuda else None,
        "devices": [device] if on_cuda else [],
        "device_type": device.type,
        "device": device,
    }


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], state["device"])


def offloaded_checkpoint(function: Callable, hidden_states: torch.Tensor, *args: Any) -> Any:
    """Run `function(hidden_states, *args)` (a decoder layer) as activation checkpointing does, keeping its input
    in pinned host memory until backward (see the module docstring). Only `hidden_states` receives a gradient;
    `args` are the layer's other positional inputs (none for transformers' decoder layers, which get the rest
    bound into `function`). Called as transformers calls a checkpointing function."""
    if not torch.is_grad_enabled():
        return function(hidden_states, *args)
    return _OffloadedLayer.apply(function, _get_rng(hidden_states.device), hidden_states, *args)
