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
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes.utils import sync_gpu

__all__ = ["PagedAdamW32bitOneSync"]


class PagedAdamW32bitOneSync(bnb.optim.PagedAdamW32bit):
    """`bitsandbytes.optim.PagedAdamW32bit` (same arguments and defaults) with one device synchronization per step.

    Overrides `step` only, the one place that relies on bitsandbytes' optimizer internals (read on 0.50; the test
    against bitsandbytes' own step catches a release that changes them).
    """

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
                updated = p
        if updated is not None:
            sync_gpu(updated)  # once: paged states are brought in and written back asynchronously
        return loss
