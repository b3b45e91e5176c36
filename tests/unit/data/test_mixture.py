"""The mixture: realised proportions, curriculum, adaptive boosts, replay override, resumption.

Statistical bound used throughout: a source with share p gets Binomial(N, p) of N windows, so
its realised share lies within Z * sqrt(p (1 - p) / N) of p except with probability about
6e-5 for Z = 4 (normal approximation). The draws are a pure function of (seed, rank, draw
index), so a passing seed passes forever; the bound states what the sampler promises.
"""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from cpt_trainer.data import DataPipeline
from cpt_trainer.data.mixture import Mixture, SourceWeights, schedule_weight, shift_replay
from cpt_trainer.data.packing import pack_window

from .conftest import make_config

Z = 4.0


def _within_bound(counts: Counter, shares: dict[str, float], n: int) -> None:
    for name, p in shares.items():
        bound = Z * math.sqrt(p * (1 - p) / n)
        assert abs(counts[name] / n - p) <= bound, (name, counts[name] / n, p, bound)


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("weights", [(0.8, 0.2, 0.0), (0.5, 0.3, 0.2), (0.97, 0.02, 0.01)],
                         ids=["80/20 domain replay", "three sources", "a rare source"])
def test_realised_shares_match_the_weights_within_the_bound(seed, weights):
    sources = [SourceWeights(n, r, w) for n, r, w in
               zip(("dom", "rep", "sft"), ("domain", "replay", "instruction"), weights) if w > 0]
    mixture = Mixture(sources, strategy="fixed", seed=seed, rank=0)
    n = 20_000
    counts = Counter(mixture.next_source(0) for _ in range(n))
    _within_bound(counts, mixture.shares(0), n)


def test_ranks_draw_different_but_equally_mixed_sequences():
    sources = [SourceWeights("dom", "domain", 0.8), SourceWeights("rep", "replay", 0.2)]
    a, b = (Mixture(sources, strategy="fixed", seed=3, rank=r) for r in (0, 1))
    seq_a = [a.next_source(0) for _ in range(5000)]
    seq_b = [b.next_source(0) for _ in range(5000)]
    assert seq_a != seq_b
    _within_bound(Counter(seq_a + seq_b), {"dom": 0.8, "rep": 0.2}, 10_000)


def test_pipeline_realised_proportions_match_the_weights(tmp_path, tokenizer, two_sources):
    pipe = DataPipeline(make_config(tmp_path, two_sources, seq_len=16), tokenizer, 0, 1)
    n = 0
    for _ in range(100):
        batch = pipe.next_batch(16)
        n += 16
        # Every window comes from one source: per-source token counts are exact.
        assert (batch.source_ids == batch.source_ids[:, :1]).all()
    realised = pipe.realised_proportions()
    assert pipe.tokens_seen == n * 16
    counts = Counter({name: round(share * n) for name, share in realised.items()})
    _within_bound(counts, {"licenses": 0.8, "stdlib": 0.2}, n)


SCHEDULE = ((0, 0.4), (10_000, 0.15), (20_000, 0.15))


@pytest.mark.parametrize("tokens,expected", [
    (0, 0.4), (2_500, 0.3375), (5_000, 0.275), (10_000, 0.15), (15_000, 0.15), (99_999, 0.15)],
    ids=["start", "quarter way", "half way", "end of ramp", "flat part", "after the last point"])
def test_curriculum_weight_is_piecewise_linear(tokens, expected):
    assert schedule_weight(SCHEDULE, tokens) == pytest.approx(expected)
    mixture = Mixture([SourceWeights("dom", "domain", 1.0, ((0, 0.6), (10_000, 0.85))),
                       SourceWeights("rep", "replay", 1.0, SCHEDULE)],
                      strategy="curriculum", seed=0, rank=0)
    dom = schedule_weight(((0, 0.6), (10_000, 0.85)), tokens)
    assert mixture.shares(tokens)["rep"] == pytest.approx(expected / (expected + dom))


def test_pipeline_follows_the_curriculum_as_tokens_are_seen(tmp_path, tokenizer, two_sources):
    ramp = 20_000
    sources = [dict(two_sources[0], schedule=[{"tokens": 0, "weight": 0.6},
                                              {"tokens": ramp, "weight": 0.85}]),
               dict(two_sources[1], schedule=[{"tokens": 0, "weight": 0.4},
                                              {"tokens": ramp, "weight": 0.15}])]
    world, seq_len, batch_size = 2, 16, 8
    pipe = DataPipeline(make_config(tmp_path, sources, seq_len=seq_len, strategy="curriculum"),
                        tokenizer, 1, world)

    def replay_weight(window: int) -> float:
        # The curriculum runs on the run's tokens, i.e. every rank's together.
        run_tokens = window * seq_len * world
        replay = 0.4 + (0.15 - 0.4) * min(run_tokens, ramp) / ramp
        return replay / (replay + 0.6 + (0.85 - 0.6) * min(run_tokens, ramp) / ramp)

    phases = {"ramp": (0, 640), "floor": (640, 1280)}  # windows; 640 * 32 tokens > ramp
    observed = {phase: 0 for phase in phases}
    for step in range(1280 // batch_size):
        assert pipe.current_weights()["stdlib"] == pytest.approx(replay_weight(step * batch_size))
        batch = pipe.next_batch(batch_size)
        phase = "ramp" if step * batch_size < 640 else "floor"
        observed[phase] += int((batch.source_ids[:, 0] == 1).sum())
    for phase, (lo, hi) in phases.items():
        p = [replay_weight(w) for w in range(lo, hi)]
        bound = Z * math.sqrt(sum(q * (1 - q) for q in p))
        assert abs(observed[phase] - sum(p)) <= bound, (phase, observed[phase], sum(p), bound)
    assert observed["ramp"] > observed["floor"] + 40  # replay really fell (expected gap ~80)


def test_adaptive_boosts_the_source_that_learns_slowest_within_the_cap(tmp_path, tokenizer,
                                                                       two_sources):
    cfg = make_config(tmp_path, two_sources, strategy="adaptive", adaptive_max_boost=1.5)
    pipe = DataPipeline(cfg, tokenizer, 0, 1)
    assert pipe.current_weights() == pytest.approx({"licenses": 0.8, "stdlib": 0.2})
    # Domain loss falls from 4 to ~2; replay stays at 4: replay is the one to up-weight. A
    # report steers the windows from FEEDBACK_LAG on, so batches are drawn in between.
    for step in range(90):
        pipe.next_batch(2)
        pipe.report_losses({"licenses": 4.0 - 2.0 * min(step, 30) / 30, "stdlib": 4.0})
    boosted = pipe.current_weights()
    assert boosted["stdlib"] > 0.2
    # Raw boost 4/2.x > 1.5 is capped: replay weight 0.2 * 1.5 against domain 0.8.
    assert boosted["stdlib"] == pytest.approx(0.3 / 1.1, rel=1e-6)
    assert boosted["stdlib"] / 0.2 <= 1.5


def test_adaptive_boost_is_proportional_below_the_cap():
    mixture = Mixture([SourceWeights("a", "domain", 1.0), SourceWeights("b", "domain", 1.0)],
                      strategy="adaptive", seed=0, rank=0, max_boost=10.0)
    mixture.report_losses({"a": 2.0, "b": 2.0})
    mixture.report_losses({"a": 1.0, "b": 2.0})  # a: EMA 1.9, progress 0.95; b: 1.0
    assert mixture.shares(0)["b"] / mixture.shares(0)["a"] == pytest.approx(1.0 / 0.95)
    mixture.report_losses({"a": float("nan"), "b": float("inf")})  # ignored, not averaged in
    assert mixture.shares(0)["b"] / mixture.shares(0)["a"] == pytest.approx(1.0 / 0.95)


@pytest.mark.parametrize("delta,replay_share", [(0.0, 0.2), (0.1, 0.3), (0.3, 0.5), (0.9, 1.0)],
                         ids=["no override", "gate adds 0.1", "gate adds 0.3", "capped at all"])
def test_replay_override_raises_the_replay_share(tmp_path, tokenizer, two_sources, delta,
                                                 replay_share):
    pipe = DataPipeline(make_config(tmp_path, two_sources, replay_delta=delta), tokenizer, 0, 1)
    assert pipe.current_weights() == pytest.approx(
        {"stdlib": replay_share, "licenses": 1.0 - replay_share})
    n = 0
    for _ in range(40):
        pipe.next_batch(16)
        n += 16
    counts = Counter({k: round(v * n) for k, v in pipe.realised_proportions().items()})
    if 0 < replay_share < 1:
        _within_bound(counts, {"stdlib": replay_share}, n)
    else:
        assert counts["stdlib"] == round(replay_share * n)


def test_replay_override_keeps_ratios_within_each_group():
    shares = {"d1": 0.45, "d2": 0.15, "sft": 0.2, "r1": 0.15, "r2": 0.05}
    roles = {"d1": "domain", "d2": "domain", "sft": "instruction", "r1": "replay", "r2": "replay"}
    out = shift_replay(shares, roles, 0.1)
    assert out["r1"] + out["r2"] == pytest.approx(0.3)
    assert out["r1"] / out["r2"] == pytest.approx(3.0)
    assert out["d1"] / out["d2"] == pytest.approx(3.0)
    assert out["d1"] / out["sft"] == pytest.approx(2.25)
    assert sum(out.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("strategy", ["curriculum", "adaptive"])
def test_resume_through_json_reproduces_batches_for_moving_weights(tmp_path, tokenizer,
                                                                   two_sources, strategy):
    sources = two_sources
    if strategy == "curriculum":
        sources = [dict(two_sources[0], schedule=[{"tokens": 0, "weight": 0.5},
                                                  {"tokens": 6_000, "weight": 0.9}]),
                   dict(two_sources[1], schedule=[{"tokens": 0, "weight": 0.5},
                                                  {"tokens": 6_000, "weight": 0.1}])]
    cfg = make_config(tmp_path, sources, seq_len=64, strategy=strategy)

    def losses(step: int) -> dict[str, float]:
        return {"licenses": 3.0 - 0.05 * step, "stdlib": 3.0}

    reference, interrupted = DataPipeline(cfg, tokenizer, 0, 1), DataPipeline(cfg, tokenizer, 0, 1)
    for step in range(15):
        for pipe in (reference, interrupted):
            pipe.next_batch(4)
            pipe.report_losses(losses(step))
    resumed = DataPipeline(cfg, tokenizer, 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    for step in range(15, 40):
        a, b = reference.next_batch(4), resumed.next_batch(4)
        for name in ("input_ids", "labels", "position_ids", "source_ids"):
            assert getattr(a, name).equal(getattr(b, name)), (step, name)
        assert reference.current_weights() == resumed.current_weights()
        reference.report_losses(losses(step))
        resumed.report_losses(losses(step))


def test_a_new_replay_override_on_resume_continues_every_source_where_it_stopped(
        tmp_path, tokenizer, two_sources):
    before = DataPipeline(make_config(tmp_path, two_sources, seq_len=32), tokenizer, 0, 1)
    for _ in range(10):
        before.next_batch(4)
    state = before.state_dict()
    after = DataPipeline(make_config(tmp_path, two_sources, seq_len=32, replay_delta=0.1),
                         tokenizer, 0, 1)
    assert after.data_version == before.data_version  # weights are not part of the data
    after.load_state_dict(state)
    assert after.current_weights()["stdlib"] == pytest.approx(0.3)
    # The next window of each source is the one the old mixture would have packed next:
    # nothing is skipped or repeated when the weights change.
    for index, stream in enumerate(after._core.streams):
        mine = pack_window(stream, 32, True, index)
        theirs = pack_window(before._core.streams[index], 32, True, index)
        assert (mine.input_ids == theirs.input_ids).all()
