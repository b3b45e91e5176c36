"""Pareto frontier and checkpoint selection."""
from __future__ import annotations

import itertools
import random

import pytest

from cpt_api.spec import CptRunSpec
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
    # step-400 is dominated by step-200 (worse domain and general, same safety); the base keeps
    # the best general perplexity, so it is on the frontier too.
    assert selection.frontier == ("base", "step-100", "step-200", "step-300")
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


SPEC_NO_GATES = build_spec()
GATED = build_spec([GATE])
HALF_GENERAL = build_spec(selection={"domain": 1.0, "general": 0.5, "behavior": 0.5, "safety": 1.0})


@pytest.mark.parametrize("spec, checkpoints, chosen, improved, closest", [
    pytest.param(GATED, [ckpt(100, 22.0, 10.3), ckpt(200, 23.0, 10.4, json=0.7)], "base", False, "step-100",
                 id="the base dominates every checkpoint: the base is chosen, the closest named"),
    pytest.param(GATED, [ckpt(100, 19.0, 10.3), ckpt(200, 15.0, 11.0)], "step-100", True, "step-100",
                 id="a passing non-frontier checkpoint beats a breaching frontier one"),
    pytest.param(GATED, [ckpt(100, 18.0, 11.0), ckpt(200, 15.0, 12.0)], "base", False, "step-200",
                 id="every checkpoint breaches a gate: never one of them, the base"),
    pytest.param(HALF_GENERAL, [ckpt(100, 18.0, 12.0)], "base", False, "step-100",
                 id="J ties with the base: the base (domain +10% = general -20% / 2 at w_g 0.5)"),
    pytest.param(SPEC_NO_GATES, [ckpt(100, 20.0, 10.0)], "base", False, "step-100",
                 id="a checkpoint equal to the base is not better than it"),
    pytest.param(SPEC_NO_GATES, [ckpt(100, 19.0, 9.9)], "step-100", True, "step-100",
                 id="a checkpoint that dominates the base is chosen"),
])
def test_the_base_is_a_candidate(spec: CptRunSpec, checkpoints: list[CheckpointEvals], chosen: str,
                                 improved: bool, closest: str) -> None:
    selection = select_checkpoint(spec, BASE, checkpoints)
    assert selection.chosen == chosen
    assert selection.verdict is not None
    assert (selection.verdict.improved, selection.verdict.checkpoint) == (improved, closest)
    if chosen == "base":
        assert "no checkpoint is better than the base" in selection.verdict.message
        assert f"closest {closest}" in selection.verdict.message
        assert "per token" in selection.verdict.message
    else:
        assert selection.scores[chosen] > 0 and selection.passed[chosen]


def test_a_checkpoint_the_base_dominates_is_never_chosen_even_with_a_positive_j() -> None:
    # behaviour is not a frontier axis: a large JSON gain lifts J above 0, but the base is at
    # least as good on domain, general and safety and better on general.
    spec = build_spec(selection={"domain": 1.0, "general": 1.0, "behavior": 5.0, "safety": 1.0})
    selection = select_checkpoint(spec, BASE, [ckpt(100, 20.0, 10.5, json=1.0)])
    assert selection.scores["step-100"] > 0
    assert "step-100" not in selection.frontier and "base" in selection.frontier
    assert selection.chosen == "base"


def test_the_verdict_names_the_gate_and_the_axes_that_held_the_best_checkpoint_back() -> None:
    selection = select_checkpoint(GATED, BASE, [ckpt(200, 15.0, 12.0, safety=0.8)])
    assert selection.chosen == "base"
    message = selection.verdict.message
    # domain 20 -> 15: +25% after 200,000 tokens; the gate on general perplexity failed
    assert "domain +25.00% over the base after 200,000 tokens (+1.25e-06 per token)" in message
    assert "held back by gate general-ppl" in message and "regressions on general, safety" in message


def test_without_evaluation_suites_the_newest_checkpoint_is_chosen_and_nothing_is_judged() -> None:
    spec = CptRunSpec.model_validate(build_spec().model_dump(by_alias=True) | {"evaluation": None})
    checkpoints = [CheckpointEvals(name="attempt-001/step-100", step=100),
                   CheckpointEvals(name="attempt-002/step-50", step=50, attempt=2)]
    selection = select_checkpoint(spec, {}, checkpoints)
    assert selection.chosen == "attempt-002/step-50" and selection.verdict is None
    assert selection.frontier == ()


def test_unevaluated_checkpoints_are_not_judged_against_the_base() -> None:
    selection = select_checkpoint(build_spec(), BASE, [CheckpointEvals(name="step-50", step=50)])
    assert selection.chosen is None and selection.verdict is None


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
