"""The host planner against what the benchmarks measured on the real trainer: each recorded
spec and model is planned again with the planner as it is now, and must stay within 25 % of the
peak host memory a rank reached.

- bench/results/load.json (`bench/bench_load.py`): a 0.84 B Llama loaded on 4 CPU ranks from
  sharded safetensors; the plan's loading moment against the rank's peak at the end of its setup.
- bench/results/host_memory.json (`bench/bench_host_memory.py`): an 89 M Llama resumed on 2 CPU
  ranks with asynchronous checkpoints; the plan's training moment against the rank's trainer and
  data worker after its first checkpoint.

Re-run the benchmark after a change to what the trainer holds; this test keeps the planner
honest between runs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cpt_api.spec import CptRunSpec
from cpt_operator.policy.memory_host import host_estimate
from cpt_operator.policy.model_shape import ModelShape

RESULTS = Path(__file__).resolve().parents[3] / "bench" / "results"


def recorded(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())  # type: ignore[no-any-return]


def planned(spec: dict[str, Any], model_config: dict[str, Any]) -> Any:
    return host_estimate(CptRunSpec.model_validate(spec), ModelShape.from_hf_config(model_config))


def test_the_loading_moment_is_within_25_percent_of_a_sharded_loads_peak():
    bench = recorded("load.json")
    plan = planned(bench["plan"]["spec"], bench["plan"]["model_config"])
    measured = max(bench["local"]["load_peak"])
    assert sum(plan.loading.values()) / measured == pytest.approx(1, abs=0.25)


def test_the_training_moment_is_within_25_percent_of_a_resumed_attempts_peak():
    bench = recorded("host_memory.json")
    plan = planned(bench["spec"], bench["model_config"])
    assert plan.peak_moment == "training"
    assert plan.rank / bench["measured_rank_peak"] == pytest.approx(1, abs=0.25)
