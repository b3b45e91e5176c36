"""`sharing.py`: which items a rank evaluates, how many padding batches it runs, and how the
shares come back in sample order."""
from __future__ import annotations

import pytest

from cpt_trainer.evals.sharing import Share, interleave

ITEMS = list("abcdefghi")  # nine items


@pytest.mark.parametrize("rank, world, expected", [
    pytest.param(0, 1, list("abcdefghi"), id="one rank takes every item"),
    pytest.param(0, 2, list("acegi"), id="the first of two ranks takes the even items"),
    pytest.param(1, 2, list("bdfh"), id="the second of two ranks takes the odd items"),
    pytest.param(3, 4, list("dh"), id="the last of four ranks takes every fourth item from its own"),
    pytest.param(9, 12, [], id="a rank beyond the item count takes nothing"),
])
def test_a_rank_takes_a_strided_share(rank, world, expected):
    assert Share(rank, world).take(ITEMS) == expected


@pytest.mark.parametrize("n, world, per_batch, lockstep, expected", [
    pytest.param(9, 1, 2, True, [0], id="one rank never pads"),
    pytest.param(10, 2, 2, True, [0, 0], id="equal shares need no padding"),
    pytest.param(9, 2, 2, True, [0, 1], id="five items need three batches of two, four items two"),
    pytest.param(9, 2, 3, True, [0, 0], id="five and four items both need two batches of three"),
    pytest.param(9, 4, 2, True, [0, 1, 1, 1],
                 id="three items need two batches where two items need one"),
    pytest.param(3, 4, 4, True, [0, 0, 0, 1], id="a rank with no item runs one padding batch"),
    pytest.param(9, 4, 2, False, [0, 0, 0, 0], id="replicas run only their own batches"),
    pytest.param(0, 4, 2, True, [0, 0, 0, 0], id="an empty suite runs no batch anywhere"),
])
def test_padding_makes_every_rank_run_as_many_batches_as_the_largest_share(
        n, world, per_batch, lockstep, expected):
    shares = [Share(rank, world, lockstep) for rank in range(world)]
    assert [s.padding(n, per_batch) for s in shares] == expected
    runs = [len(list(s.batches(list(range(n)), per_batch))) for s in shares]
    if lockstep:
        assert len(set(runs)) == 1


def test_batches_hold_the_share_in_order_and_padding_batches_are_empty():
    share = Share(3, 4, lockstep=True)
    assert list(share.batches(ITEMS, 2)) == [["d", "h"], []]
    assert list(Share(0, 4, lockstep=True).batches(ITEMS, 2)) == [["a", "e"], ["i"]]


@pytest.mark.parametrize("world", [
    pytest.param(1, id="one share is already in order"),
    pytest.param(2, id="two shares of unequal length interleave"),
    pytest.param(4, id="four shares interleave"),
    pytest.param(12, id="shares that are partly empty interleave"),
])
def test_interleaving_the_shares_restores_sample_order(world):
    assert interleave([Share(r, world).take(ITEMS) for r in range(world)]) == ITEMS


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="outside world size"):
        Share(2, 2)
