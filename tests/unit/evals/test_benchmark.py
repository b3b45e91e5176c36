"""Benchmark suites: lm-evaluation-harness tasks through a CptRun suite give what lm-eval's own
`simple_evaluate` gives on the same model and tasks (task YAMLs and data written here: no hub)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cpt_api.evaluation import SuiteSpec
from cpt_trainer.evals import Evaluator
from cpt_trainer.evals.benchmark import BenchmarkError, combine
from tests.conftest import write_benchmark_tasks

from .conftest import evaluation

SEQ_LEN = 128


def bench_suite(name: str, tasks: list[str], metric: str, uri: Path | None, **extra: object) -> SuiteSpec:
    return SuiteSpec.model_validate({"name": name, "kind": "general", "metric": metric,
                                     **({"uri": str(uri)} if uri else {}),
                                     "benchmark": {"tasks": tasks, "numFewshot": 0, **extra}})


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_benchmark_tasks(tmp_path_factory.mktemp("tasks"))


def test_a_benchmark_suite_scores_as_lm_eval_itself_does(tiny, tiny_model_dir: Path, tasks: Path) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, tokenizer = tiny
    suites = [bench_suite("sums", ["sums"], "acc", tasks), bench_suite("sums_norm", ["sums"], "acc_norm", tasks),
              bench_suite("echo", ["echo"], "exact_match", tasks, limit=4)]
    got = Evaluator(evaluation(*suites), tokenizer, device=torch.device("cpu"), seq_len=SEQ_LEN).evaluate(model)

    theirs = simple_evaluate(model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32",
                             tasks=["sums", "echo"], num_fewshot=0, batch_size=8, device="cpu",
                             task_manager=TaskManager(include_path=str(tasks), include_defaults=False), limit=None)
    sums = theirs["results"]["sums"]
    assert got["sums.acc"] == pytest.approx(sums["acc,none"], abs=1e-9)
    assert got["sums.acc_stderr"] == pytest.approx(sums["acc_stderr,none"], abs=1e-9)
    assert got["sums_norm.acc_norm"] == pytest.approx(sums["acc_norm,none"], abs=1e-9)
    assert 0 < got["sums.acc"] < 1  # a random model, 4 choices: something between all and none
    echo = simple_evaluate(model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32", tasks=["echo"],
                           num_fewshot=0, batch_size=8, device="cpu", limit=4,
                           task_manager=TaskManager(include_path=str(tasks), include_defaults=False))["results"]["echo"]
    assert got["echo.exact_match"] == pytest.approx(echo["exact_match,none"], abs=1e-9)


def test_tasks_are_weighted_by_their_sample_counts() -> None:
    suite = bench_suite("both", ["a", "b"], "acc", None)
    value, stderr = combine(suite, {"a": {"acc,none": 1.0, "acc_stderr,none": 0.0, "sample_len": 30},
                                    "b": {"acc,none": 0.0, "acc_stderr,none": 0.1, "sample_len": 10}})
    assert value == pytest.approx(0.75) and stderr == pytest.approx(0.025)
    _, unknown = combine(suite, {"a": {"acc,none": 1.0, "acc_stderr,none": "N/A", "sample_len": 1},
                                 "b": {"acc,none": 1.0, "acc_stderr,none": 0.1, "sample_len": 1}})
    assert math.isnan(unknown)


def test_an_unknown_task_or_metric_is_named(tiny, tasks: Path) -> None:
    model, tokenizer = tiny
    misspelt = Evaluator(evaluation(bench_suite("x", ["summs"], "acc", tasks)), tokenizer,
                         device=torch.device("cpu"), seq_len=SEQ_LEN)
    with pytest.raises(BenchmarkError, match="knows no task summs"):
        misspelt.evaluate(model)
    with pytest.raises(BenchmarkError, match="task sums reports no exact_match .it reports acc, acc_norm"):
        combine(bench_suite("y", ["sums"], "exact_match", None), {"sums": {"acc,none": 0.5, "acc_norm,none": 0.5}})
