"""The pure position algebra: who reads which position after a change of world size."""
from __future__ import annotations

import pytest

from cpt_trainer.data.positions import fresh, pending, reshard


def _state(queue, next_, stride):
    return {"queue": queue, "next": next_, "stride": stride}


@pytest.mark.parametrize("old,world,expected", [
    ([fresh(0, 2), fresh(1, 2)], 3,
     [_state([[0, 0, 0]], 1, 3), _state([], 2, 3), _state([], 3, 3)]),
    ([_state([[4, 2, 7]], 6, 2), _state([], 3, 2)], 1,
     [_state([[3, 0, 0], [4, 2, 7], [5, 0, 0]], 6, 1)]),
    ([_state([[8, 1, 0]], 12, 4), _state([], 9, 4), _state([[6, 3, 2]], 10, 4),
      _state([], 11, 4)], 2,
     [_state([[6, 3, 2], [9, 0, 0], [11, 0, 0]], 12, 2), _state([[8, 1, 0], [10, 0, 0]], 13, 2)]),
    ([_state([[5, 1, 3]], 7, 2), _state([], 7, 2)], 2,
     [_state([[5, 1, 3]], 7, 2), _state([], 8, 2)]),
], ids=["two fresh ranks become three: rank 0's unreached position 0 is dealt",
        "two ranks become one: begun unit kept with its progress, unreached ones taken over",
        "four ranks become two: begun and unreached positions dealt round robin in order",
        "same world size: a begun unit stays with its progress"])
def test_reshard_deals_every_unfinished_position_exactly_once(old, world, expected):
    assert reshard(old, world) == expected


@pytest.mark.parametrize("old_world,new_world", [(4, 2), (2, 3), (3, 3), (5, 1)])
def test_no_position_is_lost_or_doubled_whatever_the_progress(old_world, new_world):
    # Old ranks advanced unevenly: rank r finished r + 1 fresh positions, holds one begun.
    old = []
    for r in range(old_world):
        taken = [r + k * old_world for k in range(r + 2)]
        old.append(_state([[taken[-1], 1, 0]], taken[-1] + old_world, old_world))
    done = {q for r, s in enumerate(old) for q in range(r, s["queue"][0][0], old_world)}
    new = reshard(old, new_world)
    base = min(s["next"] for s in new)
    queued = [item[0] for s in new for item in s["queue"]]
    assert len(queued) == len(set(queued))
    assert set(queued) | done == set(range(base)) and not set(queued) & done
    assert sorted(s["next"] - base for s in new) == list(range(new_world))
    assert pending(old, base) == sorted(item for s in new for item in s["queue"])
