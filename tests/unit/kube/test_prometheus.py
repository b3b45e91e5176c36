"""Prometheus series (as the HTTP API returns them) into evaluation points."""
from __future__ import annotations

import math

import pytest

from cpt_operator.kube.prometheus import eval_points, labelled_values, scalar, selector

LABELS = {"run": "legal-7b", "namespace": "ml"}


def matrix(name: str, attempt: int, samples: list[tuple[float, float]], **labels: str) -> dict:
    return {"metric": {"__name__": name, **LABELS, "attempt": str(attempt), **labels},
            "values": [[t, repr(v) if math.isfinite(v) else ("+Inf" if v > 0 else "NaN")] for t, v in samples]}


def vector(name: str, value: float, **labels: str) -> dict:
    return {"metric": {"__name__": name, **LABELS, **labels}, "value": [1000.0, str(value)]}


def test_each_distinct_eval_step_becomes_one_point_with_the_last_scrape_of_it():
    # scrapes every second; evaluations at steps 50 (t=10) and 100 (t=20); at t=20 the step moved
    # before the metric value did (the trainer sets the step first)
    steps = [matrix("cpt_eval_step", 1, [(t, 50 if t < 20 else 100) for t in range(10, 25)])]
    general = [matrix("cpt_eval_metric", 1, [(t, 10.0 if t < 21 else 12.5) for t in range(10, 25)],
                      suite="general", metric="perplexity")]
    tokens = [matrix("cpt_eval_tokens", 1, [(t, 5000 if t < 20 else 10000) for t in range(10, 25)])]
    points = eval_points(general, steps, tokens)
    assert [(p.attempt, p.step, p.tokens, dict(p.metrics)) for p in points] == [
        (1, 50, 5000, {"general.perplexity": 10.0}),
        (1, 100, 10000, {"general.perplexity": 12.5}),
    ]
    assert all(p.checkpoint is None for p in points)


def test_attempts_are_kept_apart_and_suites_are_joined_per_evaluation():
    steps = [matrix("cpt_eval_step", 1, [(1, 50), (2, 50)]), matrix("cpt_eval_step", 2, [(5, 50), (6, 50)])]
    metrics = [matrix("cpt_eval_metric", 1, [(1, 10.0), (2, 10.0)], suite="general", metric="perplexity"),
               matrix("cpt_eval_metric", 1, [(1, 30.0), (2, 29.0)], suite="legal", metric="perplexity"),
               matrix("cpt_eval_metric", 2, [(5, 9.0), (6, 9.0)], suite="general", metric="perplexity")]
    points = eval_points(metrics, steps)
    assert [(p.attempt, p.step, dict(p.metrics)) for p in points] == [
        (1, 50, {"general.perplexity": 10.0, "legal.perplexity": 29.0}),
        (2, 50, {"general.perplexity": 9.0}),
    ]


def test_a_diverged_value_survives_as_infinity_so_gates_see_it():
    steps = [matrix("cpt_eval_step", 1, [(1, 10)])]
    metrics = [matrix("cpt_eval_metric", 1, [(1, math.inf)], suite="general", metric="perplexity")]
    (point,) = eval_points(metrics, steps)
    assert point.metrics["general.perplexity"] == math.inf


def test_samples_before_any_eval_step_or_without_labels_are_ignored():
    steps = [matrix("cpt_eval_step", 1, [(5, 10)])]
    metrics = [matrix("cpt_eval_metric", 1, [(4, 1.0), (5, 2.0)], suite="general", metric="perplexity"),
               matrix("cpt_eval_metric", 1, [(5, 3.0)], suite="general"),
               matrix("cpt_eval_metric", 3, [(5, 3.0)], suite="general", metric="perplexity")]
    (point,) = eval_points(metrics, steps)
    assert (point.step, dict(point.metrics)) == (10, {"general.perplexity": 2.0})


def test_instant_vectors_become_keyed_values():
    base = [vector("cpt_eval_base_metric", 10.0, suite="general", metric="perplexity"),
            vector("cpt_eval_base_metric", 30.0, suite="legal", metric="perplexity")]
    assert labelled_values(base, "suite", "metric") == {"general.perplexity": 10.0, "legal.perplexity": 30.0}
    assert labelled_values([vector("cpt_anomalies_total", 2, kind="grad_norm")], "kind") == {"grad_norm": 2.0}
    assert scalar([vector("cpt_step", 40), vector("cpt_step", 42)]) == 42
    assert scalar([]) is None


def test_selectors_quote_label_values():
    assert selector("r", "ns", 2) == '{run="r",namespace="ns",attempt="2"}'
    assert selector('a"b', "ns") == '{run="a\\"b",namespace="ns"}'


@pytest.mark.parametrize("metric_changes_at, step_changes_at", [
    (20, 21), (21, 20), (20, 20),
], ids=["the trainer sets the value before the step (one torn scrape)",
        "the trainer sets the step before the value (one torn scrape)",
        "both change in the same scrape"])
def test_a_scrape_torn_between_two_gauges_does_not_move_a_value_to_another_step(metric_changes_at, step_changes_at):
    times = range(10, 25)
    steps = [matrix("cpt_eval_step", 1, [(t, 50 if t < step_changes_at else 100) for t in times])]
    general = [matrix("cpt_eval_metric", 1, [(t, 10.0 if t < metric_changes_at else 12.5) for t in times],
                      suite="general", metric="perplexity")]
    points = eval_points(general, steps)
    assert [(p.step, p.metrics["general.perplexity"]) for p in points] == [(50, 10.0), (100, 12.5)]


def test_two_scrapes_of_one_evaluation_with_a_torn_one_keep_the_evaluations_own_value():
    # evaluations every scrape or two (as in tests): step 60 has one torn and one true sample
    steps = [matrix("cpt_eval_step", 1, [(1, 50), (2, 60), (3, 60), (4, 70)])]
    general = [matrix("cpt_eval_metric", 1, [(1, 10.0), (2, 10.0), (3, 11.0), (4, 12.0)],
                      suite="general", metric="perplexity")]
    assert [(p.step, p.metrics["general.perplexity"]) for p in eval_points(general, steps)] == \
        [(50, 10.0), (60, 11.0), (70, 12.0)]
