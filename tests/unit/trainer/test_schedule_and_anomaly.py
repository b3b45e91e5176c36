"""LR schedules and the step anomaly detector: pure functions of their inputs."""
from __future__ import annotations

import math

import pytest

from cpt_api.spec import AnomalySpec, CptRunSpec, DecayKind
from cpt_trainer.anomaly import AnomalyDetector
from cpt_trainer.schedule import Schedule, build_schedule


def sched(decay: DecayKind, **kw) -> Schedule:
    return Schedule(peak=1.0, min_lr=0.1, warmup=4, total=20, decay=decay, **kw)


@pytest.mark.parametrize("decay", list(DecayKind))
def test_warmup_is_linear_from_peak_over_warmup_and_never_zero(decay: DecayKind) -> None:
    s = sched(decay)
    assert [s(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("decay", [DecayKind.cosine, DecayKind.linear, DecayKind.exponential,
                                   DecayKind.wsd])
def test_decays_end_exactly_on_min_lr_and_never_rise(decay: DecayKind) -> None:
    s = sched(decay)
    lrs = [s(i) for i in range(3, 21)]
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(lrs, lrs[1:]))


def test_cosine_midpoint_and_wsd_stable_phase() -> None:
    assert sched(DecayKind.cosine)(12) == pytest.approx(0.1 + 0.9 * 0.5)  # p = 0.5
    wsd = sched(DecayKind.wsd, decay_fraction=0.25)  # the last 5 of 20 steps decay
    assert [wsd(i) for i in range(4, 15)] == [1.0] * 11
    assert wsd(15) == 1.0 and wsd(17) == pytest.approx(1.0 - 0.9 * 0.4)
    assert sched(DecayKind.constant)(19) == 1.0


def test_an_attempt_that_went_back_to_a_checkpoint_warms_up_again_then_rejoins_the_schedule() -> None:
    plain = sched(DecayKind.cosine)
    again = sched(DecayKind.cosine, rewarm_from=8, rewarm_steps=4)
    assert [again(i) for i in range(8)] == [plain(i) for i in range(8)]  # before the restore point
    # from the checkpoint's step: 1/4, 2/4, 3/4 of the schedule, then the schedule itself
    assert [again(i) for i in range(8, 12)] == pytest.approx([plain(i) * f for i, f in
                                                              zip(range(8, 12), (0.25, 0.5, 0.75, 1.0))])
    assert [again(i) for i in range(12, 20)] == [plain(i) for i in range(12, 20)]
    # a restart of that attempt from a later checkpoint continues the same curve (a pure function)
    assert sched(DecayKind.cosine, rewarm_from=8, rewarm_steps=4)(10) == again(10)
    assert sched(DecayKind.cosine, rewarm_from=8, rewarm_steps=0)(8) == plain(8)  # switched off


def spec(**budget) -> CptRunSpec:
    return CptRunSpec.model_validate({
        "baseModel": {"uri": "m"}, "data": {"sources": [{"name": "d", "role": "domain", "uri": "x"}]},
        "budget": budget, "schedule": {"warmupSteps": 2}, "optimizer": {"lr": 1e-3},
    })


def test_budget_in_tokens_and_steps_the_earlier_limit_wins() -> None:
    from cpt_operator.local.progress import Progress

    tokens_only = spec(tokens=100_000)
    by_tokens = -(-100_000 // tokens_only.tokens_per_step(1))
    assert tokens_only.total_steps(1) == by_tokens > 1
    assert spec(tokens=100_000, steps=3).total_steps(1) == 3
    both = spec(tokens=100_000, steps=by_tokens * 10)
    assert both.total_steps(1) == by_tokens
    # what `cptctl run` shows is the trainer's total, not budget.steps alone
    assert Progress(both, enabled=False, world_size=1).total == by_tokens
    s = build_schedule(spec(steps=10), 10, lr_scale=0.5)
    assert s.peak == pytest.approx(5e-4) and s.warmup == 2


def detector(**kw) -> AnomalyDetector:
    return AnomalyDetector(AnomalySpec(k=3.0, window=20, max_consecutive=2, **kw), min_history=5)


def test_non_finite_is_flagged_at_once_and_spikes_only_after_history() -> None:
    early = detector()
    assert early.observe(2.0, 100.0) is None  # no baseline yet: early grad norms are large
    d = detector()
    assert d.observe(float("nan"), 1.0).kind == "non_finite"
    assert d.observe(1.0, math.inf).kind == "non_finite"
    assert d.observe(2.0, 1.0) is None
    for g in (1.0, 1.1, 0.9, 1.0):
        assert d.observe(2.0, g) is None
    verdict = d.observe(2.0, 50.0)
    assert verdict.kind == "grad_norm" and verdict.threshold < 50.0


def test_anomalous_steps_do_not_move_the_band_and_trigger_restore_after_the_limit() -> None:
    d = detector()
    for g in (1.0, 1.2, 0.8, 1.0, 1.1, 0.9):
        d.observe(2.0, g)
    band = d.band()
    assert d.observe(2.0, 30.0) is not None and d.band() == band
    assert not d.needs_restore
    assert d.observe(9.0, 1.0).kind == "loss_spike"  # loss > 3x the recent mean
    assert d.needs_restore
    d.observe(2.0, 1.0)
    assert not d.needs_restore and d.consecutive == 0


def test_state_round_trip_flags_what_the_original_flags() -> None:
    a = detector()
    for g in (1.0, 1.3, 0.7, 1.0, 1.2, 0.8, 1.1):
        a.observe(2.0, g)
    b = detector()
    b.load_state_dict(a.state_dict())
    for loss, g in ((2.0, 1.0), (2.0, 9.0), (7.0, 1.0)):
        assert a.observe(loss, g) == b.observe(loss, g)


def _trained(d: AnomalyDetector) -> AnomalyDetector:
    for g in (1.0, 1.2, 0.8, 1.0, 1.1, 0.9):
        d.observe(2.0, g, {"legal": 2.2, "code": 1.6})
    return d


@pytest.mark.parametrize("losses, blamed", [
    pytest.param({"legal": 8.8, "code": 1.7}, "legal", id="the source whose own loss spiked is blamed"),
    pytest.param({"legal": 6.6, "code": 4.8}, None, id="every source rising together blames none"),
    pytest.param({"legal": 2.3, "junk": 9.0}, "junk", id="a source never seen is compared with the run's mean"),
    pytest.param({"legal": math.nan, "code": 1.6}, "legal", id="a non-finite source loss is the worst rise"),
])
def test_an_anomaly_is_blamed_on_the_source_that_spiked(losses: dict[str, float],
                                                         blamed: str | None) -> None:
    verdict = _trained(detector()).observe(7.0, 1.0, losses)
    assert verdict is not None and verdict.source == blamed


def test_per_source_history_survives_a_state_round_trip() -> None:
    a = _trained(detector())
    b = detector()
    b.load_state_dict(a.state_dict())
    assert a.observe(7.0, 1.0, {"legal": 8.8, "code": 1.7}) == \
        b.observe(7.0, 1.0, {"legal": 8.8, "code": 1.7})


def test_early_evaluation_is_dense_while_the_stability_gap_opens_then_regular() -> None:
    from cpt_api.evaluation import EvaluationSpec

    suites = [{"name": "g", "kind": "general", "uri": "g.jsonl"}]
    early = EvaluationSpec.model_validate({"every": 50, "early": {"every": 5, "steps": 20}, "suites": suites})
    assert [s for s in range(1, 151) if early.evaluates_at(s)] == [5, 10, 15, 20, 50, 100, 150]
    plain = EvaluationSpec.model_validate({"every": 50, "suites": suites})
    assert [s for s in range(1, 151) if plain.evaluates_at(s)] == [50, 100, 150]
