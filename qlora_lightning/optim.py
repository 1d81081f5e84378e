"""The paper's paged AdamW (bitsandbytes, 32-bit states), updating all parameters of a group in one launch and
waiting for the device once per step.

bitsandbytes 0.50's `Optimizer8bit.step` updates one parameter at a time: per parameter a few dozen Python
statements, a prefetch of its paged states, one kernel launch, then `torch.cuda.synchronize()`. With LoRA on every
linear layer of a 7B model that is 448 tiny updates a step, and the GPU waits for the host between each: a profiled
packed 7B step (BENCHMARKS.md, `bench/idle_gaps.py`) had the GPU idle 69 ms of 500, 67 ms of it inside the
optimizer's step. bitsandbytes' 32-bit AdamW kernel is element-wise, so one launch over the concatenation of a
group's parameters, gradients and states computes, element for element, what the 448 launches compute.
`PagedAdamW32bitOneSync` keeps each parameter group's two states as one buffer (paged as bitsandbytes pages them:
managed memory that the driver may evict under memory pressure), of which each parameter's `state1`/`state2` are
views; a step concatenates the gradients and the parameters, launches bitsandbytes' own kernel once (per 2**30
elements), copies the parameters back, and synchronizes once at the end, which paging needs (paged states are moved
asynchronously). A check that must pass before anything changes and waits for the device (`check_before_update`:
the non-finite guard's) runs after the host has prepared the update and right before its launch, so that the
device is not left idle during that preparation. Its results are bitwise those of `bitsandbytes.optim.PagedAdamW32bit`
(tested), its state dict has bitsandbytes' per-parameter layout, and checkpoints of either load into the other.

Where one launch cannot stand for the per-parameter updates, the group is updated one parameter at a time with
bitsandbytes' own `update_step` (still one synchronization per step): parameters at different step counts (one
that had no gradient at some step), bitsandbytes' per-parameter overrides (`GlobalOptimManager`), or 8-bit states.

`states_on_host: true` keeps the 32-bit Adam states in pinned host memory and brings each parameter's states to
the card only for its update, so that the card never holds more than one parameter's (the 830 M LoRA parameters
of 70B at r 64 have 6.6 GB of them: what keeps 70B from fitting 42 GiB of a 48 GB card). Paging would move them
out only under memory pressure, after they had taken the card's room; and bitsandbytes' own move to the host
(`functional.prefetch_tensor(to_cpu=True)`) passes device -1 to `cudaDeviceGetAttribute` (its 0.50 source), which
CUDA refuses. The cost is two transfers of the states per optimizer step, which gradient accumulation amortizes
(70b.yaml steps once per 64 micro-batches). Measured on an H200 at 70B, micro-batch 1 × 512, an optimizer step
every 8 (BENCHMARKS.md): the card's memory in use peaks at 40.3 GiB instead of 46.6, at 731 tokens/s instead of
809; `configs/70b.yaml` turns it on. FSDP cannot gather host states into a checkpoint (`fsdp.check_optimizer`).
Host states are updated one parameter at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes import functional as bnb_F
from bitsandbytes.utils import sync_gpu

__all__ = ["PagedAdamW32bitOneSync"]

#: The per-parameter states that `states_on_host` keeps in host memory (Adam's two moments).
HOST_STATES = ("state1", "state2")
#: Elements per kernel launch of a group's update: bitsandbytes passes the element count as a 32-bit integer.
LAUNCH_ELEMENTS = 2**30
#: bitsandbytes pages a state buffer only from this many elements up (0.50's `get_state_buffer`); smaller ones are
#: plain device tensors.
PAGED_FROM = 100_000


class _GroupStates:
    """The parameters of one group that one launch updates, and their two states as flat buffers (float32), of which
    each parameter's `state1`/`state2` are views (`views1`/`views2`, in parameter order)."""

    def __init__(self, params: list[torch.Tensor], state1: torch.Tensor, state2: torch.Tensor) -> None:
        self.params, self.state1, self.state2 = params, state1, state2
        self.views1: list[torch.Tensor] = []
        self.views2: list[torch.Tensor] = []

    def serves(self, params: list[torch.Tensor], states: dict) -> bool:
        """Whether these buffers still are `params`' states (not after a state dict was loaded, say)."""
        return (
            len(params) == len(self.params)
            and all(a is b for a, b in zip(params, self.params, strict=True))
            and all(
                states[p].get("state1") is v1 and states[p].get("state2") is v2
                for p, v1, v2 in zip(params, self.views1, self.views2, strict=True)
            )
        )


def _as_paged_like(view: torch.Tensor, flat: Any) -> torch.Tensor:
    """`view` of `flat`, marked paged as `flat` is, so bitsandbytes treats it as paged memory (its device checks,
    `prefetch_state`, `to_gpu`): the mark is an attribute of the tensor object, which a view does not inherit."""
    if getattr(flat, "is_paged", False):
        marked: Any = view  # bitsandbytes' marks are plain Python attributes, which torch's stubs do not declare
        marked.is_paged, marked.page_deviceid = True, flat.page_deviceid
    return view


class PagedAdamW32bitOneSync(bnb.optim.PagedAdamW32bit):
    """`bitsandbytes.optim.PagedAdamW32bit` (same arguments and defaults, bitwise the same updates) with one kernel
    launch per parameter group and one device synchronization per step (see the module docstring).

    Overrides `step`, and `get_state_buffer` for `states_on_host`: the places that rely on bitsandbytes' optimizer
    internals (read on 0.50; the tests against bitsandbytes' own step catch a release that changes them).

    `states_on_host`: keep the states in pinned host memory between updates (above; off by default, as paging
    is the paper's). The other arguments are bitsandbytes' (`lr`, `betas`, `eps`, `weight_decay`, ...), with its
    defaults.
    """

    def __init__(self, params, *, states_on_host: bool = False, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.states_on_host = states_on_host
        self._group_states: dict[int, _GroupStates] = {}  # by group index, for the groups updated in one launch
        self._checks: list[Callable[[], None]] = []  # run in the next step before its updates (check_before_update)

    def check_before_update(self, check: Callable[[], None]) -> None:
        """Run `check` once in the next (or the current) step, after its closure and everything the host prepares for
        the update, right before the first parameter or state changes; an exception it raises leaves both as they
        were. For a check that waits for the device (`callbacks.NonFiniteGuard` reading its flag): run before the
        step, the device would idle while the host prepares the update (at 7B, gradient clipping plus this step's
        Python for 448 parameters); run here, that preparation overlaps the end of backward."""
        self._checks.append(check)

    @torch.no_grad()
    def step(self, closure=None):
        try:
            return self._step(closure)
        finally:
            self._checks = []  # each is for one step: a step that raised leaves none behind

    def _step(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        updates: list[Callable[[], None]] = []  # prepared first, launched after the checks
        updated = None
        for gindex, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if self._one_launch_serves(params):
                updates.append(self._prepare_group(group, gindex, params))
            else:
                updates.append(functools.partial(self._update_each, group, gindex))
            updated = params[-1]
        for check in self._checks:
            check()
        for update in updates:
            update()
        if updated is not None:
            sync_gpu(updated)  # once: paged or host states are brought in and written back asynchronously
        return loss

    def _one_launch_serves(self, params: list[torch.Tensor]) -> bool:
        """Whether one launch computes what bitsandbytes' per-parameter updates would: same step count, device and
        dtype throughout (gradients in their parameters' dtype), no per-parameter overrides, 32-bit states without update-norm clipping, states on the
        device (not `states_on_host`)."""
        overridden = self.mng.index2config or any(id(p) in self.mng.pid2config for p in params)
        args: Any = self.args  # bitsandbytes' MockArgs, its attributes set from a dict
        return (
            not self.states_on_host
            and not overridden
            and args.optim_bits == 32
            and args.max_unorm == 0.0
            and len({self.state[p].get("step", 0) for p in params}) == 1
            and len({(p.device, p.dtype) for p in params}) == 1
            and all(g is not None and g.dtype == p.dtype for p in params for g in [p.grad])  # one kernel dtype
        )

    def _update_each(self, group, gindex: int) -> None:
        """bitsandbytes' update, one parameter at a time (its states its own, or views of a group's buffers)."""
        for pindex, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if not self.state[p]:
                self.init_state(group, p, gindex, pindex)
            self.prefetch_state(p)
            if self.states_on_host:
                self._update_from_host(group, p, gindex, pindex)
            else:
                self.update_step(group, p, gindex, pindex)

    def _prepare_group(self, group, gindex: int, params: list[torch.Tensor]) -> Callable[[], None]:
        """bitsandbytes' 32-bit update of all `params` at once, prepared: their gradients and values concatenated, the
        states flat (`_states_of`); the returned function launches it (one launch per `LAUNCH_ELEMENTS`), copies the
        new values back and counts the step, and is the first to change a parameter or a state."""
        states = self._states_of(gindex, params)
        config = self.get_config(gindex, 0, group)  # the group's settings: no parameter has its own here
        step = self.state[params[0]]["step"] + 1
        grads = torch.cat([g.reshape(-1) for p in params if (g := p.grad) is not None])  # every one has a gradient
        values = torch.cat([p.detach().reshape(-1) for p in params])
        targets = [p.detach() for p in params]
        sources = [v.view(p.shape) for p, v in zip(params, values.split([p.numel() for p in params]), strict=True)]
        for flat in (states.state1, states.state2):
            if getattr(flat, "is_paged", False):
                bnb_F.prefetch_tensor(flat)
        betas = config["betas"]

        def launch() -> None:
            for p in params:
                self.state[p]["step"] = step
            for start in range(0, values.numel(), LAUNCH_ELEMENTS):
                part = slice(start, start + LAUNCH_ELEMENTS)
                bnb_F.optimizer_update_32bit(
                    self.optimizer_name,
                    grads[part],
                    values[part],
                    _as_paged_like(states.state1[part], states.state1),
                    betas[0],
                    config["eps"],
                    step,
                    config["lr"],
                    _as_paged_like(states.state2[part], states.state2),
                    betas[1],
                    betas[2] if len(betas) >= 3 else 0.0,
                    config.get("alpha", 0.0),
                    config["weight_decay"],
                    1.0,
                    None,
                    max_unorm=0.0,
                    skip_zeros=config["skip_zeros"],
                )
            torch._foreach_copy_(targets, sources)

        return launch

    def _states_of(self, gindex: int, params: list[torch.Tensor]) -> _GroupStates:
        """The flat states of `params` (group `gindex`), made on first use and whenever they no longer are the
        parameters' states: then each parameter's present states (a loaded checkpoint's, or its own) are copied in,
        and a parameter without any starts from zeros at step 0, as bitsandbytes' `init_state` starts it."""
        found = self._group_states.get(gindex)
        if found is not None and found.serves(params, self.state):
            return found
        n = sum(p.numel() for p in params)
        states = _GroupStates(params, self._flat_buffer(n, params[0].device), self._flat_buffer(n, params[0].device))
        replaced = set()
        offset = 0
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
            for key, flat, views in (
                ("state1", states.state1, states.views1),
                ("state2", states.state2, states.views2),
            ):
                view = _as_paged_like(flat[offset : offset + p.numel()].view(p.shape), flat)
                if key in state:
                    view.copy_(state[key])
                    replaced.add(id(state[key]))
                state[key] = view
                views.append(view)
            offset += p.numel()
        if replaced:  # bitsandbytes' page manager keeps every paged buffer it made: forget the replaced ones
            self.page_mng.paged_tensors = [t for t in self.page_mng.paged_tensors if id(t) not in replaced]
        self._group_states[gindex] = states
        return states

    def _flat_buffer(self, n: int, device: torch.device) -> torch.Tensor:
        """`n` zeros (float32) on `device`, paged as bitsandbytes pages a state buffer of that size."""
        if not (self.is_paged and device.type == "cuda" and n >= PAGED_FROM):
            return torch.zeros(n, dtype=torch.float32, device=device)
        flat = bnb_F.get_paged(n, dtype=torch.float32, device=device)
        bnb_F.fill(flat, 0)
        self.page_mng.paged_tensors.append(flat)
        return flat

    def get_state_buffer(self, p, dtype=torch.float32):
        """bitsandbytes' state buffer, or with `states_on_host` a pinned host one for a parameter on a GPU."""
        if not self.states_on_host or p.device.type == "cpu":
            return super().get_state_buffer(p, dtype)
        return torch.zeros(p.shape, dtype=dtype, pin_memory=True)

    def _update_from_host(self, group, p, gindex, pindex) -> None:
        """bitsandbytes' update of `p` on its device, its states copied there from host memory and back after,
        both copies queued on the current stream behind the update (the step's one synchronization waits)."""
        state = self.state[p]
        keys = [k for k in HOST_STATES if k in state]
        for k in keys:  # states loaded from a checkpoint arrive on the parameter's device: to the host, once
            if p.device.type != "cpu" and state[k].device.type != "cpu":
                state[k] = state[k].cpu().pin_memory()
        host = {k: state[k] for k in keys}
        for k in keys:
            state[k] = host[k].to(p.device, non_blocking=True)
        try:
            self.update_step(group, p, gindex, pindex)
        finally:
            for k in keys:
                if state[k] is not host[k]:
                    host[k].copy_(state[k], non_blocking=True)
                state[k] = host[k]
