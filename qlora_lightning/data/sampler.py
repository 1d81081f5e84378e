"""A length-grouped, distributed, mid-epoch-resumable training sampler.

Order of one epoch (a pure function of seed, epoch, lengths, batch size and world size):
1. a permutation of all examples drawn from `numpy.random.default_rng((seed, epoch))`;
2. with `group_by_length` (the paper's setting, as in HF's `LengthGroupedSampler`), the permutation is cut
   into mega-batches of up to 50 global batches, each sorted by length (longest first), so a batch holds
   examples of similar length and little padding; the mega-batch with the longest example goes first so
   that running out of memory happens at step 1, not hours in;
3. the order is cut into global batches (`batch_size * num_replicas`); rank r takes the r-th slice of
   each, so every rank gets the same number of examples (at most `num_replicas - 1` are dropped per
   epoch) and ranks step on batches of similar length.

Resume: `state_dict(epoch, consumed)` records how many of this rank's samples of `epoch` were consumed;
`load_state_dict` makes the next iteration skip exactly those, once. The sampler cannot know what was
consumed when DataLoader workers and Lightning prefetch ahead, so the trainer's completed batch count
should be passed in (`InstructionDataModule.state_dict` does this). It subclasses `DistributedSampler`
so that Lightning uses it as is under DDP instead of wrapping it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import DistributedSampler

__all__ = ["LengthGroupedSampler"]


class LengthGroupedSampler(DistributedSampler):
    """Yields this rank's example indices for the current epoch (see the module docstring).

    `lengths`: token count of each example (only used when `group_by_length`). `batch_size`: the
    per-device micro-batch the DataLoader will form. `mega_batch_mult`: global batches per mega-batch,
    HF's default of 50 (capped so that there are at least 4 mega-batches). `epoch_source`: when given,
    `set_epoch` takes the epoch from it instead of its argument; the datamodule passes the trainer's
    `current_epoch`, because after resuming from an end-of-epoch checkpoint Lightning 2.6 calls
    `set_epoch` with a number one ahead of the epoch it is running.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 42,
        group_by_length: bool = True,
        mega_batch_mult: int = 50,
        epoch_source: Callable[[], int] | None = None,
    ):
        n = len(lengths)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if n < num_replicas:
            raise ValueError(f"{n} training examples cannot be shared by {num_replicas} ranks")
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.group_by_length = group_by_length
        self.mega_batch_mult = mega_batch_mult
        self.epoch_source = epoch_source
        self.num_samples = n // num_replicas  # per rank, equal on every rank
        self.total_size = self.num_samples * num_replicas
        self._skip = 0  # samples of `self.epoch` to skip at the next iteration (set by load_state_dict)
        self._yielded = 0  # samples of `self.epoch` handed out so far, skipped ones included

    def _global_order(self, epoch: int) -> np.ndarray:
        n = len(self.lengths)
        order = np.random.default_rng((self.seed, epoch)).permutation(n)
        if self.group_by_length:
            global_batch = self.batch_size * self.num_replicas
            mega = max(1, min(n // (4 * global_batch), self.mega_batch_mult)) * global_batch
            megas = [order[i : i + mega] for i in range(0, n, mega)]
            megas = [m[np.argsort(-self.lengths[m], kind="stable")] for m in megas]
            longest = int(np.argmax([self.lengths[m[0]] for m in megas]))
            megas[0], megas[longest] = megas[longest], megas[0]
            order = np.concatenate(megas)
        return order[: self.total_size]

    def indices(self, epoch: int) -> np.ndarray:
        """All of this rank's indices for `epoch`, in order (no skipping)."""
        order = self._global_order(epoch)
        global_batch = self.batch_size * self.num_replicas
        full = len(order) // global_batch
        head = order[: full * global_batch].reshape(full, self.num_replicas, self.batch_size)[:, self.rank, :]
        tail = order[full * global_batch :]
        share = len(tail) // self.num_replicas
        return np.concatenate([head.ravel(), tail[self.rank * share : (self.rank + 1) * share]])

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
        """Resume state: `consumed` samples of `epoch` on this rank, plus what the order depends on.

        Defaults are the sampler's own epoch and yield count, which are exact only when nothing is fetched
        ahead (a plain loop over the sampler); Lightning training must pass the trainer's count.
        """
        return {
            "epoch": self.epoch if epoch is None else epoch,
            "consumed": self._yielded if consumed is None else consumed,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "batch_size": self.batch_size,
            "num_examples": len(self.lengths),
            "group_by_length": self.group_by_length,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off: the next iteration yields exactly the samples not yet consumed.

        A state taken at the end of an epoch leaves nothing to yield until `set_epoch` moves to the next one
        (Lightning, resuming from such a checkpoint, first asks the finished epoch for one more batch).

        The order depends on seed, world size, batch size and data, so resuming with any of them changed
        cannot avoid repeats or skips: that raises instead of silently reshuffling.
        """
        mine = self.state_dict()
        changed = [f"{k}: {state[k]!r} -> {mine[k]!r}" for k in mine if k not in ("epoch", "consumed") and state[k] != mine[k]]
        if changed:
            raise ValueError(
                "cannot resume the data order mid-epoch, settings changed since the checkpoint ("
                + "; ".join(changed)
                + "); resume with the same data, seed, batch size and devices"
            )
        self.epoch = int(state["epoch"])
        self._skip = self._yielded = min(int(state["consumed"]), self.num_samples)
