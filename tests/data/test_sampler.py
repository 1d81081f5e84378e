"""The length-grouped sampler: coverage, determinism, grouping, ranks, and mid-epoch resume."""

from __future__ import annotations

import numpy as np
import pytest

from qlora_lightning.data.sampler import LengthGroupedSampler

LENGTHS = np.random.default_rng(0).integers(10, 500, size=1003).tolist()


def batches(indices, size):
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    s = LengthGroupedSampler(LENGTHS, 8, seed=1)
    epoch0 = list(s)
    assert sorted(epoch0) == list(range(len(LENGTHS))) and len(s) == len(LENGTHS)
    assert list(LengthGroupedSampler(LENGTHS, 8, seed=1)) == epoch0
    assert list(LengthGroupedSampler(LENGTHS, 8, seed=2)) != epoch0
    s.set_epoch(1)
    assert sorted(s) == sorted(epoch0) and list(s) != epoch0


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


def test_ranks_share_each_epoch_equally_and_disjointly():
    ranks = [list(LengthGroupedSampler(LENGTHS, 4, num_replicas=3, rank=r)) for r in range(3)]
    assert {len(r) for r in ranks} == {len(LENGTHS) // 3}
    together = [i for r in ranks for i in r]
    assert len(set(together)) == len(together) == len(LENGTHS) - len(LENGTHS) % 3
    # a step's batches on the three ranks are consecutive slices of one length-sorted global batch
    single = list(LengthGroupedSampler(LENGTHS, 12, num_replicas=1))
    assert [i for step in zip(*(batches(r, 4) for r in ranks)) for b in step for i in b][:12] == single[:12]
    with pytest.raises(ValueError, match="rank"):
        LengthGroupedSampler(LENGTHS, 4, num_replicas=2, rank=2)


@pytest.mark.parametrize("num_replicas", [1, 2])
@pytest.mark.parametrize("group_by_length", [True, False])
def test_resume_mid_epoch_gives_the_same_remaining_order(num_replicas, group_by_length):
    def make(rank, epoch=2):
        s = LengthGroupedSampler(LENGTHS, 4, num_replicas=num_replicas, rank=rank, seed=7, group_by_length=group_by_length)
        s.set_epoch(epoch)
        return s

    for rank in range(num_replicas):
        full = list(make(rank))
        it = iter(make(rank))
        first = [next(it) for _ in range(40)]
        state = make(rank).state_dict(epoch=2, consumed=40)
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
    taken = [next(it) for _ in range(10)]
    state = s.state_dict()
    assert (state["epoch"], state["consumed"]) == (0, 10)
    resumed = LengthGroupedSampler(LENGTHS, 4)
    resumed.load_state_dict(state)
    assert taken + list(resumed) == list(LengthGroupedSampler(LENGTHS, 4))

    done = LengthGroupedSampler(LENGTHS, 4)
    done.load_state_dict({**state, "consumed": len(LENGTHS)})
    assert list(done) == []  # the epoch was finished: nothing is repeated
    done.load_state_dict({**state, "consumed": len(LENGTHS)})
    done.set_epoch(1)
    assert sorted(done) == list(range(len(LENGTHS)))


def test_epoch_source_overrides_set_epoch_argument():
    current = {"epoch": 1}
    s = LengthGroupedSampler(LENGTHS, 4, epoch_source=lambda: current["epoch"])
    s.set_epoch(2)
    assert s.epoch == 1


def test_resume_with_changed_settings_is_refused():
    state = LengthGroupedSampler(LENGTHS, 4, num_replicas=2).state_dict(epoch=0, consumed=8)
    with pytest.raises(ValueError, match=r"num_replicas: 2 -> 4.*same data, seed, batch size and devices"):
        LengthGroupedSampler(LENGTHS, 4, num_replicas=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"num_examples: 1003 -> 1002"):
        LengthGroupedSampler(LENGTHS[:-1], 4, num_replicas=2).load_state_dict(state)
