"""Shared cases for the policy tests: a small CptRun spec with one suite per kind, and builders
for observations."""
from __future__ import annotations

from typing import Any

from cpt_api.spec import CptRunSpec
from cpt_operator.policy import EvalPoint

SUITES = [
    {"name": "domain", "kind": "domain", "uri": "/e/domain.jsonl"},
    {"name": "general", "kind": "general", "uri": "/e/general.jsonl"},
    {"name": "json", "kind": "behavior", "uri": "/e/json.jsonl", "metric": "json_valid"},
    {"name": "safety", "kind": "safety", "uri": "/e/safety.jsonl", "metric": "refusal_rate"},
    {"name": "chat", "kind": "drift", "uri": "/e/chat.jsonl", "metric": "kl_to_base"},
]
BASE = {"domain.perplexity": 20.0, "general.perplexity": 10.0, "json.json_valid": 0.8,
        "safety.refusal_rate": 0.9, "chat.kl_to_base": 0.0}


def build_spec(gates: list[dict[str, Any]] | None = None, replay: float | None = 0.2,
               **extra: Any) -> CptRunSpec:
    sources = [{"name": "dom", "role": "domain", "uri": "/d", "weight": 1.0 - (replay or 0.0)}]
    if replay:
        sources.append({"name": "rep", "role": "replay", "uri": "/r", "weight": replay})
    doc = {"baseModel": {"uri": "/m"}, "data": {"sources": sources},
           "budget": {"steps": 1000}, "schedule": {"warmupSteps": 10},
           "evaluation": {"suites": SUITES}, "gates": gates or []} | extra
    return CptRunSpec.model_validate(doc)


def point(step: int, attempt: int = 1, checkpoint: str | None = None, stable: bool = True,
          **metrics: float) -> EvalPoint:
    """An evaluation; metric keyword names use `__` for the dot (general__perplexity)."""
    values = {k.replace("__", "."): v for k, v in metrics.items()}
    return EvalPoint(attempt=attempt, step=step, tokens=step * 1000, metrics=values,
                     checkpoint=checkpoint, stable=stable)


def general(*values: float, attempt: int = 1, start: int = 100) -> list[EvalPoint]:
    """Evaluations of general perplexity every 100 steps, each with a checkpoint."""
    return [point(start + 100 * i, attempt, f"a{attempt}-step-{start + 100 * i}",
                  general__perplexity=v) for i, v in enumerate(values)]


