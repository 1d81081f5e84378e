"""A length-grouped, distributed training sampler whose position survives a change of device count.

The unit of the order is the global batch G = `batch_size × accumulate × num_replicas`: the examples of one
optimizer step (e.g. 16 = 8 × 1 × 2 on 2 GPUs, or 8 × 2 × 1 on 1 GPU). Order of one epoch, a pure function
of seed, epoch, lengths and G only:
1. a permutation of all examples drawn from `numpy.random.default_rng((seed, epoch))`;
2. with `group_by_length` (the paper's setting, as in HF's `LengthGroupedSampler`), the permutation is cut
   into mega-batches of up to 50 global batches, each sorted by length (longest first), so a batch holds
   examples of similar length and little padding; the mega-batch with the longest example goes first so
   that running out of memory happens at step 1, not hours in;
3. the order is truncated to a multiple of G, so that an epoch has only full optimizer steps: at most G - 1
   examples are left out of each epoch (different ones each epoch, as the permutation changes);
4. within each chunk of G consecutive examples, micro-step a (0 .. accumulate - 1) of rank r takes
   `chunk[(a * num_replicas + r) * batch_size :][:batch_size]`.

Consequence: after K micro-batches on every rank, the consumed examples are exactly the first
K × batch_size × num_replicas of the global order. So every optimizer step sees the same set of examples
whatever the split into devices and accumulation, and a position is a single global count.

Resume: `state_dict(epoch, consumed)` records how many examples of `epoch` all ranks together consumed;
`load_state_dict` accepts another world size, micro-batch or accumulation as long as G (and seed and data)
are unchanged, and makes the next iteration skip this rank's share of them, once. The sampler cannot know
what was consumed when DataLoader workers and Lightning prefetch ahead, so the trainer's completed batch
count should be passed in (`resume.data_state` does this for the data module). It subclasses `DistributedSampler`
so that Lightning uses it as is under DDP instead of wrapping it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import DistributedSampler

__all__ = ["LengthGroupedSampler"]

# Settings the order depends on: a resume with any of them changed would repeat or skip examples.
_ORDER_KEYS = ("global_batch", "seed", "num_examples", "group_by_length")


class LengthGroupedSampler(DistributedSampler):
    """Yields this rank's example indices for the current epoch (see the module docstring).

    `lengths`: token count of each example (only used when `group_by_length`). `batch_size`: the
    per-device micro-batch the DataLoader will form. `accumulate`: micro-batches per optimizer step
    (the trainer's `accumulate_grad_batches`); 1, no accumulation, is what a plain loop needs.
    `mega_batch_mult`: global batches per mega-batch, HF's default of 50 (capped so that there are at
    least 4 mega-batches). `epoch_source`: when given, `set_epoch` takes the epoch from it instead of its
    argument; the datamodule passes the trainer's `current_epoch`, because after resuming from an
    end-of-epoch checkpoint Lightning 2.6 calls `set_epoch` with a number one ahead of the epoch it is running.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        accumulate: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 42,
        group_by_length: bool = True,
        mega_batch_mult: int = 50,
        epoch_source: Callable[[], int] | None = None,
    ):
        n = len(lengths)
        if batch_size < 1 or accumulate < 1:
            raise ValueError(f"batch_size and accumulate must be at least 1, got {batch_size} and {accumulate}")
        super().__init__(
            range(n),  # type: ignore[arg-type]  # torch annotates a Dataset; any sized sequence serves (its length)
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.global_batch = batch_size * accumulate * num_replicas
        if n < self.global_batch:
            raise ValueError(
                f"{n} training examples are fewer than one optimizer step's global batch of {self.global_batch} "
                f"(batch_size {batch_size} × accumulate {accumulate} × {num_replicas} ranks)"
            )
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.accumulate = accumulate
        self.group_by_length = group_by_length
        self.mega_batch_mult = mega_batch_mult
        self.epoch_source = epoch_source
        self.total_size = n // self.global_batch * self.global_batch  # all ranks, full optimizer steps only
        self.num_samples = self.total_size // num_replicas  # per rank, equal on every rank
        self._skip = 0  # samples of `self.epoch` to skip at the next iteration (set by load_state_dict)
        self._yielded = 0  # samples of `self.epoch` handed out so far, skipped ones included

    def global_order(self, epoch: int) -> np.ndarray:
        """The epoch's examples in optimizer-step order, all ranks together (`total_size` of them)."""
        n = len(self.lengths)
        order = np.random.default_rng((self.seed, epoch)).permutation(n)
        if self.group_by_length:
            mega = max(1, min(n // (4 * self.global_batch), self.mega_batch_mult)) * self.global_batch
            megas = [order[i : i + mega] for i in range(0, n, mega)]
            megas = [m[np.argsort(-self.lengths[m], kind="stable")] for m in megas]
            longest = int(np.argmax([self.lengths[m[0]] for m in megas]))
            megas[0], megas[longest] = megas[longest], megas[0]
            order = np.concatenate(megas)
        return order[: self.total_size]

    def indices(self, epoch: int) -> np.ndarray:
        """All of this rank's indices for `epoch`, in order (no skipping)."""
        steps = self.global_order(epoch).reshape(-1, self.accumulate, self.num_replicas, self.batch_size)
        return steps[:, :, self.rank, :].ravel()

    def __iter__(self) -> Iterator[int]:
        start, self._skip = self._skip, 0
        self._yielded = start
        return self._iterate(self.indices(self.epoch)[start:].tolist())

    def _iterate(self, indices: list[int]) -> Iterator[int]:
        for i in indices:
            self._yielded += 1
            yield i

    def __len__(self) -> int:
        """The full epoch (also when resuming), as Lightning expects to count batches from the epoch start."""
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order (Lightning calls this at each epoch start); a pending skip is for its own epoch only."""
        if self.epoch_source is not None:
            epoch = self.epoch_source()
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def state_dict(self, epoch: int | None = None, consumed: int | None = None) -> dict:
        """Resume state: `consumed` examples of `epoch`, all ranks together, plus what the order depends on.

        Defaults are the sampler's own epoch and its yield count times the ranks, exact only when nothing is
        fetched ahead and every rank went as far (a plain loop over the sampler); Lightning training must pass
        the trainer's count. `num_replicas`, `batch_size` and `accumulate` are recorded for information: a
        resume may change them as long as `global_batch` stays.
        """
        return {
            "epoch": self.epoch if epoch is None else epoch,
            "consumed": self._yielded * self.num_replicas if consumed is None else consumed,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "num_examples": len(self.lengths),
            "group_by_length": self.group_by_length,
            "num_replicas": self.num_replicas,
            "batch_size": self.batch_size,
            "accumulate": self.accumulate,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off: the next iteration yields exactly this rank's examples not yet consumed.

        A state taken at the end of an epoch leaves nothing to yield until `set_epoch` moves to the next one
        (Lightning, resuming from such a checkpoint, first asks the finished epoch for one more batch).

        The order depends on seed, data and the global batch, so resuming with any of them changed cannot
        avoid repeats or skips: that raises instead of silently reshuffling. So does a position that the new
        micro-batch × ranks does not divide, as the ranks could not split it into whole micro-batches.
        """
        mine = self.state_dict()
        changed = [f"{k}: {state.get(k)!r} -> {mine[k]!r}" for k in _ORDER_KEYS if state.get(k) != mine[k]]
        if changed:
            raise ValueError(
                "cannot resume the data order mid-epoch, settings changed since the checkpoint ("
                + "; ".join(changed)
                + "); resume with the same data, seed and global batch (batch_size × accumulate_grad_batches × "
                "devices; the split of it may change)"
            )
        consumed = min(int(state["consumed"]), self.total_size)
        per_micro_step = self.batch_size * self.num_replicas
        if consumed % per_micro_step:
            raise ValueError(
                f"cannot resume the data position: the checkpoint consumed {consumed} examples of epoch "
                f"{state['epoch']}, not a multiple of batch_size {self.batch_size} × {self.num_replicas} ranks = "
                f"{per_micro_step}, so the ranks cannot split it into whole micro-batches; resume with a micro-batch "
                "× devices that divides it, or from a checkpoint at an optimizer step"
            )
        self.epoch = int(state["epoch"])
        self._skip = self._yielded = consumed // self.num_replicas
