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

`states_on_host: true` also sends each paged state back to host memory right after its update, so that between
optimizer steps the card holds none of the 32-bit Adam states (6.6 GB for the 830 M LoRA parameters of 70B at
r 64: what keeps 70B from fitting 42 GiB of a 48 GB card). Paging would move them out only under memory pressure,
after they had already taken the card's room. The cost is two transfers of the states per optimizer step, which
gradient accumulation amortizes (70b.yaml steps once per 64 micro-batches).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes import functional as F
from bitsandbytes.utils import sync_gpu

__all__ = ["PagedAdamW32bitOneSync"]


class PagedAdamW32bitOneSync(bnb.optim.PagedAdamW32bit):
    """`bitsandbytes.optim.PagedAdamW32bit` (same arguments and defaults) with one device synchronization per step.

    Overrides `step` (and adds one argument); `step` is the one place that relies on bitsandbytes' optimizer internals (read on 0.50; the test
    against bitsandbytes' own step catches a release that changes them).

    `states_on_host`: move each paged state to host memory after its update (off: paging leaves them on the card).
    Only paged states move: bitsandbytes pages those of tensors with at least 100,000 elements, and none on a CPU.
    The other arguments are bitsandbytes' (`lr`, `betas`, `eps`, `weight_decay`, ...), with its defaults.
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
                self.update_step(group, p, gindex, pindex)
                if self.states_on_host:
                    self._page_out(p)
                updated = p
        if updated is not None:
            sync_gpu(updated)  # once: paged states are brought in and written back asynchronously
        return loss

    def _page_out(self, p: torch.Tensor) -> None:
        """Queue the move of `p`'s paged states to host memory, after its update on the same stream."""
        for key in ("state1", "state2"):
            state = self.state[p].get(key)
            if getattr(state, "is_paged", False):
                F.prefetch_tensor(state, to_cpu=True)
