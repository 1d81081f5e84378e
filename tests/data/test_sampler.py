"""The length-grouped sampler: coverage, determinism, grouping, ranks, the same optimizer steps on any split of
the global batch, and mid-epoch resume, also onto another split."""

from __future__ import annotations

import numpy as np
import pytest

from qlora_lightning.data.sampler import LengthGroupedSampler

LENGTHS = np.random.default_rng(0).integers(10, 500, size=1003).tolist()


def batches(indices, size):
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def test_each_epoch_is_a_permutation_of_full_steps_fixed_by_seed_and_epoch():
    s = LengthGroupedSampler(LENGTHS, 8, seed=1)
    epoch0 = list(s)
    assert len(epoch0) == len(set(epoch0)) == len(s) == 1000  # 125 full global batches of 8; 3 examples left out
    assert list(LengthGroupedSampler(LENGTHS, 8, seed=1)) == epoch0
    assert list(LengthGroupedSampler(LENGTHS, 8, seed=2)) != epoch0
    s.set_epoch(1)
    epoch1 = list(s)
    assert len(epoch1) == 1000 and epoch1 != epoch0 and set(epoch1) != set(epoch0)  # other examples left out
    accumulating = LengthGroupedSampler(LENGTHS, 8, accumulate=3, seed=1)  # global batch 24: 41 steps, 19 left out
    assert len(list(accumulating)) == len(accumulating) == 984
    with pytest.raises(
        ValueError,
        match=r"1003 training examples are fewer than .* global batch of 1024 "
        r"\(batch_size 64 × accumulate 4 × 4 ranks\)",
    ):
        LengthGroupedSampler(LENGTHS, 64, accumulate=4, num_replicas=4)


def test_group_by_length_makes_batches_of_similar_length_longest_first():
    def padding(order):
        return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in batches(order, 8))

    grouped = list(LengthGroupedSampler(LENGTHS, 8))
    plain = list(LengthGroupedSampler(LENGTHS, 8, group_by_length=False))
    assert padding(grouped) < padding(plain) / 5
    assert LENGTHS[grouped[0]] == max(LENGTHS)  # a too-long batch fails at step 1, not hours in
    mega = min(50, len(LENGTHS) // (4 * 8)) * 8  # 50 batches, fewer so that there are at least 4 mega-batches
    for start in range(0, len(grouped), mega):
        chunk = [LENGTHS[i] for i in grouped[start : start + mega]]
        assert chunk == sorted(chunk, reverse=True)
    # mega-batches count global batches (micro-batch × accumulation × ranks), not micro-batches
    assert (
        LengthGroupedSampler(LENGTHS, 2, accumulate=2, num_replicas=2).global_order(0)
        == LengthGroupedSampler(LENGTHS, 8).global_order(0)
    ).all()


def test_ranks_share_each_epoch_equally_and_disjointly():
    ranks = [list(LengthGroupedSampler(LENGTHS, 4, num_replicas=3, rank=r)) for r in range(3)]
    assert {len(r) for r in ranks} == {len(LENGTHS) // 12 * 4}
    together = [i for r in ranks for i in r]
    assert len(set(together)) == len(together) == len(LENGTHS) // 12 * 12
    # a step's batches on the three ranks are consecutive slices of one length-sorted global batch
    single = list(LengthGroupedSampler(LENGTHS, 12, num_replicas=1))
    assert [i for step in zip(*(batches(r, 4) for r in ranks), strict=True) for b in step for i in b] == single
    with pytest.raises(ValueError, match="rank"):
        LengthGroupedSampler(LENGTHS, 4, num_replicas=2, rank=2)


def samplers(world, micro, accum, epoch=0, **kw):
    """One sampler per rank of a (world size, micro-batch, accumulation) split, at `epoch`."""
    ranks = [
        LengthGroupedSampler(LENGTHS, micro, accumulate=accum, num_replicas=world, rank=r, seed=7, **kw)
        for r in range(world)
    ]
    for s in ranks:
        s.set_epoch(epoch)
    return ranks


def steps(rank_orders, micro, accum):
    """The examples of each optimizer step: `accum` consecutive micro-batches of `micro` on every rank."""
    per_rank = micro * accum
    return [
        sorted(i for order in rank_orders for i in order[k : k + per_rank])
        for k in range(0, len(rank_orders[0]), per_rank)
    ]


SPLITS = [(1, 16, 1), (1, 8, 2), (2, 8, 1), (2, 4, 2), (4, 2, 2), (1, 2, 8), (8, 1, 2)]  # world × micro × accum = 16


@pytest.mark.parametrize("group_by_length", [True, False])
def test_every_optimizer_step_sees_the_same_examples_whatever_the_split(group_by_length):
    for epoch in (0, 3):
        reference = None
        for world, micro, accum in SPLITS:
            ranks = samplers(world, micro, accum, epoch, group_by_length=group_by_length)
            got = steps([list(s) for s in ranks], micro, accum)
            assert len(got) == len(LENGTHS) // 16 and all(len(step) == 16 for step in got)
            if reference is None:
                reference = got
                order = ranks[0].global_order(epoch)
                assert got == [sorted(order[k : k + 16]) for k in range(0, len(order), 16)]
            assert got == reference, (world, micro, accum)


@pytest.mark.parametrize(
    "saved, resumed", [((2, 4, 1), (1, 4, 2)), ((1, 4, 2), (2, 4, 1)), ((2, 4, 1), (4, 1, 2)), ((1, 8, 1), (2, 2, 2))]
)
def test_resume_on_another_split_continues_the_same_steps(saved, resumed):
    """Save after 7 optimizer steps of epoch 2 on one split, resume on another: the remaining steps are the
    uninterrupted run's, and the next epoch is untouched."""
    world, micro, accum = saved
    iterators = [iter(s) for s in samplers(world, micro, accum, epoch=2)]
    done = [[next(it) for _ in range(7 * micro * accum)] for it in iterators]  # 7 steps on every rank
    state = samplers(world, micro, accum)[0].state_dict(epoch=2, consumed=7 * micro * accum * world)
    assert (state["consumed"], state["global_batch"], state["num_replicas"]) == (56, 8, world)

    world, micro, accum = resumed
    ranks = samplers(world, micro, accum)
    for s in ranks:
        s.load_state_dict(state)
        s.set_epoch(2)
    rest = steps([list(s) for s in ranks], micro, accum)
    uninterrupted = steps([list(s) for s in samplers(world, micro, accum, epoch=2)], micro, accum)
    assert steps(done, *saved[1:]) == uninterrupted[:7]
    assert rest == uninterrupted[7:] and len(rest) == len(LENGTHS) // 8 - 7
    for s in ranks:
        s.set_epoch(3)
    assert steps([list(s) for s in ranks], micro, accum) == steps(
        [list(s) for s in samplers(world, micro, accum, 3)], micro, accum
    )


@pytest.mark.parametrize("num_replicas", [1, 2])
@pytest.mark.parametrize("group_by_length", [True, False])
def test_resume_mid_epoch_gives_the_same_remaining_order(num_replicas, group_by_length):
    def make(rank, epoch=2):
        s = LengthGroupedSampler(
            LENGTHS, 4, num_replicas=num_replicas, rank=rank, seed=7, group_by_length=group_by_length
        )
        s.set_epoch(epoch)
        return s

    for rank in range(num_replicas):
        full = list(make(rank))
        it = iter(make(rank))
        first = [next(it) for _ in range(40)]
        state = make(rank).state_dict(epoch=2, consumed=40 * num_replicas)  # all ranks
        resumed = make(rank)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # as Lightning does at the epoch start: same epoch, the skip stays
        assert len(resumed) == len(full)  # Lightning counts batches from the epoch start
        assert first + list(resumed) == full
        assert list(resumed) == full  # the skip applies once
        resumed.set_epoch(3)
        assert list(resumed) == list(make(rank, epoch=3))


def test_own_count_for_plain_loops_and_end_of_epoch_state():
    s = LengthGroupedSampler(LENGTHS, 4)
    it = iter(s)
    taken = [next(it) for _ in range(12)]
    state = s.state_dict()
    assert (state["epoch"], state["consumed"]) == (0, 12)
    resumed = LengthGroupedSampler(LENGTHS, 4)
    resumed.load_state_dict(state)
    assert taken + list(resumed) == list(LengthGroupedSampler(LENGTHS, 4))

    done = LengthGroupedSampler(LENGTHS, 4)
    done.load_state_dict({**state, "consumed": len(LENGTHS) // 4 * 4})
    assert list(done) == []  # the epoch was finished: nothing is repeated
    done.load_state_dict({**state, "consumed": len(LENGTHS) // 4 * 4})
    done.set_epoch(1)
    assert len(set(done)) == len(LENGTHS) // 4 * 4


def test_epoch_source_overrides_set_epoch_argument():
    current = {"epoch": 1}
    s = LengthGroupedSampler(LENGTHS, 4, epoch_source=lambda: current["epoch"])
    s.set_epoch(2)
    assert s.epoch == 1


def test_resume_with_changed_order_or_an_unsplittable_position_is_refused():
    state = LengthGroupedSampler(LENGTHS, 4, num_replicas=2).state_dict(epoch=0, consumed=8)
    LengthGroupedSampler(LENGTHS, 2, accumulate=2, num_replicas=2).load_state_dict(state)  # same global batch: fine
    with pytest.raises(ValueError, match=r"global_batch: 8 -> 16\).*same data, seed and global batch"):
        LengthGroupedSampler(LENGTHS, 4, num_replicas=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"global_batch: 8 -> 16\)"):
        LengthGroupedSampler(LENGTHS, 4, accumulate=2, num_replicas=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"\(seed: 42 -> 1\)"):
        LengthGroupedSampler(LENGTHS, 4, num_replicas=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"\(num_examples: 1003 -> 1002\)"):
        LengthGroupedSampler(LENGTHS[:-1], 4, num_replicas=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"\(group_by_length: True -> False\)"):
        LengthGroupedSampler(LENGTHS, 4, num_replicas=2, group_by_length=False).load_state_dict(state)
    mid_step = LengthGroupedSampler(LENGTHS, 4, accumulate=2).state_dict(epoch=0, consumed=4)  # 1 of 2 micro-batches
    unsplittable = r"consumed 4 examples of epoch 0, not a multiple of batch_size 4 × 2 ranks = 8, so the ranks cannot"
    with pytest.raises(ValueError, match=unsplittable):
        LengthGroupedSampler(LENGTHS, 4, num_replicas=2).load_state_dict(mid_step)
    resumed = LengthGroupedSampler(LENGTHS, 2, accumulate=4)  # 2 whole micro-batches of 2: fine
    resumed.load_state_dict(mid_step)
    assert list(resumed) == list(LengthGroupedSampler(LENGTHS, 2, accumulate=4))[4:]
