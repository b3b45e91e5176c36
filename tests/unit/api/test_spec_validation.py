"""Every invalid field gives a clear error that names the field."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from cpt_api import CptRun, InvalidSpec, parse_run
from cpt_operator.cli import main

EXAMPLE = Path(__file__).parents[3] / "examples" / "tiny-local.yaml"


def valid_doc() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        node: Any = doc
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node[key]
        node[keys[-1]] = value
    return apply


def _add_gate(doc: dict[str, Any]) -> None:
    doc["spec"]["gates"] = [{"name": "general", "suite": "general", "threshold": 0.1}]


def _second_source_same_name(doc: dict[str, Any]) -> None:
    doc["spec"]["data"]["sources"][1]["name"] = "licenses"


def _only_replay(doc: dict[str, Any]) -> None:
    doc["spec"]["data"]["sources"] = doc["spec"]["data"]["sources"][1:]


def _schedule_without_curriculum(doc: dict[str, Any]) -> None:
    doc["spec"]["data"]["sources"][0]["schedule"] = [{"tokens": 0, "weight": 1}, {"tokens": 10, "weight": 2}]


def _relative_gate_too_big(doc: dict[str, Any]) -> None:
    doc["spec"]["evaluation"] = {"suites": [{"name": "general", "kind": "general", "uri": "x.jsonl"}]}
    doc["spec"]["gates"] = [{"name": "g", "suite": "general", "threshold": 5}]


def _plateau_on_a_missing_suite(doc: dict[str, Any]) -> None:
    doc["spec"]["stopPolicy"] = {"plateau": {"suite": "licence"}}


def _no_improvement_without_a_domain_suite(doc: dict[str, Any]) -> None:
    doc["spec"]["evaluation"] = {"suites": [{"name": "general", "kind": "general", "uri": "x.jsonl"}]}
    doc["spec"]["stopPolicy"] = {"noImprovement": {"evals": 2}}


def _suite(**suite: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        doc["spec"]["evaluation"] = {"suites": [{"name": "s", "kind": "general", **suite}]}
    return apply


BAD_SPECS = [
    ("an unknown role names the valid roles", _set("spec.data.sources.0.role", "domian"),
     "spec.data.sources[0].role", "valid values"),
    ("a negative weight is refused", _set("spec.data.sources.1.weight", -1),
     "spec.data.sources[1].weight", "greater than 0"),
    ("a misspelled field is reported as unknown", _set("spec.packing.seqlen", 64),
     "spec.packing.seqlen", "unknown field"),
    ("a tiny seqLen is refused", _set("spec.packing.seqLen", 4), "spec.packing.seqLen", "16"),
    ("warm-up must end before the budget", _set("spec.schedule.warmupSteps", 50), "spec",
     "warmupSteps"),
    ("fullState needs a checkpoint base", _set("spec.baseModel.restoreMode", "fullState"),
     "spec.baseModel", "fullState"),
    ("importing needs a checkpoint base", _set("spec.baseModel.importCheckpoint", True),
     "spec.baseModel", "importCheckpoint"),
    ("an unknown decay names the options", _set("spec.schedule.decay", "step"),
     "spec.schedule.decay", "cosine"),
    ("a run without a budget has no end", _set("spec.budget", {}), "spec.budget", "budget"),
    ("a gate must read a defined suite", _add_gate, "spec", "evaluation.suites"),
    ("a plateau must watch a defined suite", _plateau_on_a_missing_suite, "spec", "stopPolicy.plateau.suite"),
    ("noImprovement needs a domain suite", _no_improvement_without_a_domain_suite, "spec", "kind domain"),
    ("a suite without texts needs to be a benchmark", _suite(), "spec.evaluation.suites[0]", "uri is required"),
    ("a benchmark reports a benchmark metric", _suite(metric="perplexity", benchmark={"tasks": ["arc_easy"]}),
     "spec.evaluation.suites[0]", "acc, acc_norm or exact_match"),
    ("a text suite cannot report acc", _suite(uri="x.jsonl", metric="acc"), "spec.evaluation.suites[0]",
     "general measures"),
    ("a benchmark names at least one task", _suite(metric="acc", benchmark={"tasks": []}),
     "spec.evaluation.suites[0].benchmark.tasks", "at least 1"),
    ("a code suite reports pass_at_1", _suite(uri="x.jsonl", metric="acc", code={}), "spec.evaluation.suites[0]",
     "reports pass_at_1 or pass_at_k"),
    ("pass_at_1 needs programs to run", _suite(uri="x.jsonl", metric="pass_at_1"), "spec.evaluation.suites[0]",
     "those need `code`"),
    ("pass_at_k needs programs to run", _suite(uri="x.jsonl", metric="pass_at_k"), "spec.evaluation.suites[0]",
     "those need `code`"),
    ("pass@k needs at least k samples", _suite(metric="pass_at_k", code={"problems": "humaneval", "k": 10}),
     "spec.evaluation.suites[0].code", "code.k (10) must not exceed code.samples (1)"),
    ("a code suite reads a file or the package's problems", _suite(metric="pass_at_1", code={}),
     "spec.evaluation.suites[0]", "uri is required"),
    ("only HumanEval ships in a package", _suite(metric="pass_at_1", code={"problems": "mbpp"}),
     "spec.evaluation.suites[0].code.problems", "humaneval"),
    ("a code suite is not a drift check", _suite(uri="x.jsonl", kind="drift", metric="pass_at_1", code={}),
     "spec.evaluation.suites[0]", "other than drift or safety"),
    ("a code suite's memory is a quantity", _suite(uri="x.jsonl", metric="pass_at_1", code={"memory": "1 gig"}),
     "spec.evaluation.suites[0].code.memory", "pattern"),
    ("source names are unique", _second_source_same_name, "spec.data", "unique"),
    ("a mixture without domain data is refused", _only_replay, "spec.data", "domain"),
    ("a schedule needs the curriculum strategy", _schedule_without_curriculum, "spec.data",
     "curriculum"),
    ("a relative gate threshold is a fraction", _relative_gate_too_big, "spec.gates[0]",
     "fraction"),
    ("minLr above lr is refused", _set("spec.schedule.minLr", 1.0), "spec", "minLr"),
    ("hybrid sharding needs more than one node", _set("spec.training.parallelism", {"strategy": "hsdp"}),
     "spec", "hsdp"),
    ("CPU offload needs a sharded strategy",
     _set("spec.training.parallelism", {"strategy": "ddp", "cpuOffload": True}),
     "spec.training.parallelism", "cpuOffload"),
    ("a GPU memory that is not a quantity is refused", _set("spec.resources", {"gpuMemory": "80 gigs"}),
     "spec.resources.gpuMemory", "pattern"),
    ("a pod memory that is not a quantity is refused", _set("spec.resources", {"memory": "900 gigs"}),
     "spec.resources.memory", "pattern"),
    ("a bad run name is refused", _set("metadata.name", "Bad_Name"), "metadata.name", "pattern"),
    ("an http data source is refused", _set("spec.data.sources.0.uri", "http://169.254.169.254/latest/"),
     "spec.data.sources[0].uri", "pattern"),
    ("a base on an unknown scheme is refused", _set("spec.baseModel.uri", "ftp://host/model"),
     "spec.baseModel.uri", "pattern"),
    ("the wrong kind is refused", _set("kind", "Job"), "kind", "CptRun"),
]


@pytest.mark.parametrize("mutate,path,hint", [b[1:] for b in BAD_SPECS], ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_error_names_the_field(mutate: Callable[[dict[str, Any]], None], path: str,
                                        hint: str) -> None:
    doc = copy.deepcopy(valid_doc())
    mutate(doc)
    with pytest.raises(InvalidSpec) as info:
        parse_run(doc)
    messages = [str(e) for e in info.value.errors]
    assert any(e.path == path and hint in str(e) for e in info.value.errors), messages


def test_the_example_is_valid_and_fills_defaults() -> None:
    run = parse_run(valid_doc())
    assert isinstance(run, CptRun)
    assert run.spec.optimizer.betas == (0.9, 0.95)
    assert run.spec.resources.procs_per_node == 1


def test_every_error_is_reported_at_once() -> None:
    doc = valid_doc()
    _set("spec.data.sources.0.role", "x")(doc)
    _set("spec.packing.boundary", "none")(doc)
    with pytest.raises(InvalidSpec) as info:
        parse_run(doc)
    assert {e.path for e in info.value.errors} >= {"spec.data.sources[0].role", "spec.packing.boundary"}


def test_cptctl_validate_prints_paths_and_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = valid_doc()
    doc["spec"]["packing"]["boundary"] = "cross"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "spec.packing.boundary" in err and "'eos' or 'documentMask'" in err
    assert main(["validate", str(EXAMPLE)]) == 0
    assert "is valid" in capsys.readouterr().out


def test_wire_form_round_trips() -> None:
    run = parse_run(valid_doc())
    again = parse_run({"apiVersion": run.api_version, "kind": run.kind,
                       "metadata": run.metadata.dump(), "spec": run.spec.dump()})
    assert again.spec == run.spec


def test_a_benchmark_suite_needs_no_uri_and_keeps_its_settings() -> None:
    doc = copy.deepcopy(valid_doc())
    doc["spec"]["evaluation"] = {"suites": [{"name": "arc", "kind": "general", "metric": "acc_norm",
                                             "benchmark": {"tasks": ["arc_easy"], "numFewshot": 5, "limit": 200}}]}
    suite = parse_run(doc).spec.evaluation.suites[0]
    assert suite.uri is None and suite.benchmark.tasks == ["arc_easy"]
    assert (suite.benchmark.num_fewshot, suite.benchmark.limit, suite.benchmark.batch_size) == (5, 200, 8)
