"""Where each rank is in a source, and how those positions are dealt out again. Pure, no I/O.

The work of a source is an endless sequence of *positions* 0, 1, 2, ...: position q is unit
`order(q // U)[q % U]` of epoch q // U, where U is the source's unit count and `order(e)` the
epoch's permutation of units (a function of seed, source and epoch, see stream.py). Every
position is read by exactly one rank, once; so every document is trained on exactly once per
epoch, on any world size, and a source with fewer units than ranks still feeds every rank
(successive epochs of its units go to different ranks).

A rank's position in a source (JSON-ready, `SourceState`):
- `queue`: the positions it holds and has not finished, in order, each `[q, docs, offset]`:
  `docs` documents of the unit are done and the next token is token `offset` of the next one
  (a document split across windows continues where it stopped). Only the head is ever begun.
- `next`, `stride`: when the queue runs dry the rank takes position `next`, then
  `next + stride`, ...: rank r of w starts at r with stride w, so fresh positions are dealt
  round robin.

Resharding (`reshard`, N saved states -> M new ones). Let B = the largest `next` of the old
ranks. Everything at or after B is untouched by all of them: the new ranks deal it fresh,
rank r' of M from B + r' with stride M. Below B, the positions still to do are the old queues
(begun or not, with their progress) plus, for each old rank, its own fresh positions between
its `next` and B that it never reached. These are sorted by position and dealt round robin:
the i-th goes to new rank i mod M, progress and all. Positions done by any old rank appear in
neither set, so they are never read again. With M = N the pipeline does not reshard at all: it
loads each rank's own state, which is what keeps a same-size resume bit-identical.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SourceState = dict[str, Any]
"""{"queue": [[q, docs, offset], ...], "next": int, "stride": int}"""


def fresh(rank: int, world_size: int, base: int = 0) -> SourceState:
    """The position of a rank that has read nothing since `base`."""
    return {"queue": [], "next": base + rank, "stride": world_size}


def unreached(state: SourceState, base: int) -> list[list[int]]:
    """A rank's own fresh positions in [next, base): dealt to it, never started."""
    return [[q, 0, 0] for q in range(int(state["next"]), base, int(state["stride"]))]


def pending(states: Sequence[SourceState], base: int) -> list[list[int]]:
    """Every position below `base` that some old rank still had to do, in position order."""
    items = [list(map(int, item)) for s in states for item in s["queue"]]
    items += [item for s in states for item in unreached(s, base)]
    return sorted(items)


def reshard(states: Sequence[SourceState], world_size: int) -> list[SourceState]:
    """The positions of `world_size` new ranks that continue the saved ranks' work."""
    if not states:
        raise ValueError("resharding needs the saved state of at least one rank")
    base = max(int(s["next"]) for s in states)
    todo = pending(states, base)
    return [{**fresh(rank, world_size, base), "queue": todo[rank::world_size]}
            for rank in range(world_size)]


def reshard_pipeline(states: Sequence[dict[str, Any]], rank: int,
                     world_size: int) -> dict[str, Any]:
    """The pipeline state of new rank `rank` of `world_size` from the states of all old ranks.

    Streams: `reshard` per source. Mixture: the draw counter is the largest old one (draws are
    per rank, so a new rank never repeats a draw index it used before); the adaptive losses
    are the same on every rank (reports are all-reduced), so rank 0's; its loss reports not
    yet applied steer from the first new window. Tokens: each source's run total moves into
    `base`, so the curriculum position (run tokens) and realised proportions carry over."""
    first = states[0]
    names = list(first["streams"])
    base = {n: int(first.get("base", {}).get(n, 0)) +
            sum(int(s["tokens"].get(n, 0)) for s in states) for n in first["tokens"]}
    mixture = {**first["mixture"], "draws": max(int(s["mixture"]["draws"]) for s in states)}
    return {
        **first, "rank": rank, "world_size": world_size, "mixture": mixture,
        "tokens": {n: 0 for n in base}, "base": base, "windows": 0,
        "feedback": [[0, losses] for _, losses in first.get("feedback", [])],
        "streams": {n: {**reshard([s["streams"][n] for s in states], world_size)[rank],
                        "units": first["streams"][n].get("units")} for n in names},
    }
