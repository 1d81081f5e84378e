"""The paper's paged AdamW (bitsandbytes, 32-bit states), waiting for the device once per step instead of once per
parameter.

bitsandbytes 0.50's `Optimizer8bit.step` calls `torch.cuda.synchronize()` after each parameter's update. With LoRA on
every linear layer of a 7B model that is 448 waits per step, each leaving the GPU idle while the host prepares the
next launch: a profiled 7B step (BENCHMARKS.md) has ~80 ms without any kernel running, of 731 ms. The updates need
no such wait: they are launched in order on one stream and read only their own tensors. `PagedAdamW32bitOneSync`
launches the same updates (bitsandbytes' own `init_state`, `prefetch_state` and `update_step`, in the same order)
and synchronizes once at the end, which paging needs (paged states are moved asynchronously). Its results are
bitwise those of `bitsandbytes.optim.PagedAdamW32bit` (tested), and checkpoints of either load into the other.

Measured on an H200 (BENCHMARKS.md, sixth run): 0.740 → 0.725 s per 7B step, 2 %, about the bench's run-to-run
spread, so it is an option rather than a config default; select it in a config with
`optimizer: {class_path: qlora_lightning.optim.PagedAdamW32bitOneSync, init_args: {lr: 2.0e-4}}`.

`states_on_host: true` keeps the 32-bit Adam states in pinned host memory and brings each parameter's states to
the card only for its update, so that the card never holds more than one parameter's (the 830 M LoRA parameters
of 70B at r 64 have 6.6 GB of them: what keeps 70B from fitting 42 GiB of a 48 GB card). Paging would move them
out only under memory pressure, after they had taken the card's room; and bitsandbytes' own move to the host
(`functional.prefetch_tensor(to_cpu=True)`) passes device -1 to `cudaDeviceGetAttribute` (its 0.50 source), which
CUDA refuses. The cost is two transfers of the states per optimizer step, which gradient accumulation amortizes
(70b.yaml steps once per 64 micro-batches). Measured on an H200 at 70B, micro-batch 1 × 512, an optimizer step
every 8 (BENCHMARKS.md): the card's memory in use peaks at 40.3 GiB instead of 46.6, at 731 tokens/s instead of
809; `configs/70b.yaml` turns it on. FSDP cannot gather host states into a checkpoint (`fsdp.check_optimizer`).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes.utils import sync_gpu

__all__ = ["PagedAdamW32bitOneSync"]

#: The per-parameter states that `states_on_host` keeps in host memory (Adam's two moments).
HOST_STATES = ("state1", "state2")


class PagedAdamW32bitOneSync(bnb.optim.PagedAdamW32bit):
    """`bitsandbytes.optim.PagedAdamW32bit` (same arguments and defaults) with one device synchronization per step.

    Overrides `step`, and `get_state_buffer` for `states_on_host`: the places that rely on bitsandbytes' optimizer
    internals (read on 0.50; the tests against bitsandbytes' own step catch a release that changes them).

    `states_on_host`: keep the states in pinned host memory between updates (above; off by default, as paging
    is the paper's). The other arguments are bitsandbytes' (`lr`, `betas`, `eps`, `weight_decay`, ...), with its
    defaults.
    """

    def __init__(self, params, *, states_on_host: bool = False, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.states_on_host = states_on_host

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        updated = None
        for gindex, group in enumerate(self.param_groups):
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
                updated = p
        if updated is not None:
            sync_gpu(updated)  # once: paged or host states are brought in and written back asynchronously
        return loss

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
