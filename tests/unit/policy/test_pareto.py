"""Pareto frontier and checkpoint selection."""
from __future__ import annotations

import itertools
import random

import pytest

from cpt_operator.policy import CheckpointEvals, pareto_front, select_checkpoint
from tests.unit.policy.policy_cases import BASE, build_spec


def brute_force(vectors: list[tuple[float, ...]]) -> list[int]:
    """Reference: i is on the frontier iff no j is >= everywhere and > somewhere."""
    def dominated(i: int) -> bool:
        return any(all(a >= b for a, b in zip(vectors[j], vectors[i])) and vectors[j] != vectors[i]
                   for j in range(len(vectors)))
    return [i for i in range(len(vectors)) if not dominated(i)]


@pytest.mark.parametrize("seed, n, dims, grid", [
    pytest.param(seed, n, dims, grid, id=f"seed {seed}: {n} points in {dims} dims on a grid of {grid}")
    for seed, (n, dims, grid) in enumerate(itertools.product([1, 7, 60], [1, 2, 3], [3, 1000]))
])
def test_frontier_matches_brute_force(seed: int, n: int, dims: int, grid: int) -> None:
    rng = random.Random(seed)
    # A coarse grid produces ties and duplicates, the cases a sweep gets wrong.
    vectors = [tuple(float(rng.randrange(grid)) for _ in range(dims)) for _ in range(n)]
    assert pareto_front(vectors) == brute_force(vectors)


def ckpt(step: int, domain: float, general: float, safety: float = 0.9,
         json: float = 0.8) -> CheckpointEvals:
    return CheckpointEvals(name=f"step-{step}", step=step, tokens=step * 1000,
                           evals={"domain.perplexity": domain, "general.perplexity": general,
                                  "safety.refusal_rate": safety, "json.json_valid": json})


GATE = {"name": "general-ppl", "suite": "general", "threshold": 0.05}


def test_choice_is_max_score_on_the_frontier_not_the_last_or_domain_best() -> None:
    checkpoints = [ckpt(100, 18.0, 10.1), ckpt(200, 16.0, 10.2), ckpt(300, 13.0, 10.8),
                   ckpt(400, 17.0, 10.4)]
    selection = select_checkpoint(build_spec([GATE]), BASE, checkpoints)
    # step-400 is dominated by step-200 (worse domain and general, same safety).
    assert selection.frontier == ("step-100", "step-200", "step-300")
    assert selection.passed == {"step-100": True, "step-200": True, "step-300": False,
                                "step-400": True}
    # step-300 has the best J but fails the gate; the domain-best and the last lose.
    assert selection.scores["step-300"] > selection.scores["step-200"]
    assert selection.chosen == "step-200"


def test_score_is_the_weighted_sum_of_normalised_gains() -> None:
    spec = build_spec(selection={"domain": 2.0, "general": 1.0, "behavior": 0.5, "safety": 3.0})
    selection = select_checkpoint(spec, BASE, [ckpt(100, 16.0, 11.0, safety=0.8, json=0.9)])
    # domain 20 -> 16 (+20%), general 10 -> 11 (-10%), json +0.1, refusals -0.1 (rates absolute)
    assert selection.scores["step-100"] == pytest.approx(2 * 0.2 - 0.1 + 0.5 * 0.1 - 3 * 0.1)


def test_without_a_passing_frontier_checkpoint_the_best_score_wins_with_a_warning() -> None:
    selection = select_checkpoint(build_spec([GATE]), BASE, [ckpt(100, 18.0, 11.0),
                                                             ckpt(200, 15.0, 12.0)])
    assert selection.chosen == "step-200"
    assert any("no frontier checkpoint passes" in w for w in selection.warnings)


def test_equal_scores_go_to_the_earlier_step() -> None:
    selection = select_checkpoint(build_spec(), BASE, [ckpt(300, 18.0, 10.0),
                                                       ckpt(100, 18.0, 10.0)])
    assert selection.frontier == ("step-100", "step-300")
    assert selection.chosen == "step-100"


def test_a_checkpoint_missing_a_metric_is_left_out_with_a_warning() -> None:
    partial = CheckpointEvals(name="step-50", step=50, evals={"domain.perplexity": 10.0})
    selection = select_checkpoint(build_spec(), BASE, [partial, ckpt(100, 18.0, 10.0)])
    assert selection.chosen == "step-100" and "step-50" not in selection.scores
    assert any("step-50" in w for w in selection.warnings)


def test_an_axis_the_base_cannot_normalise_is_dropped_with_a_warning() -> None:
    base = {k: v for k, v in BASE.items() if k != "safety.refusal_rate"}
    selection = select_checkpoint(build_spec(), base, [ckpt(100, 18.0, 10.0, safety=0.1)])
    assert selection.chosen == "step-100" and "safety" not in selection.gains["step-100"]
    assert any("safety.refusal_rate" in w for w in selection.warnings)


def test_no_checkpoints_choose_nothing() -> None:
    selection = select_checkpoint(build_spec(), BASE, [])
    assert (selection.frontier, selection.chosen) == ((), None)
