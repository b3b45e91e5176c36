"""The tiny model loaded once, and suite files written on the fly."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cpt_api.evaluation import EvaluationSpec, SuiteSpec


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def fresh_model(tiny_model_dir: Path) -> torch.nn.Module:
    """A private copy for tests that change weights."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def suite(name: str, kind: str, uri: Path | str, metric: str, **extra: Any) -> SuiteSpec:
    return SuiteSpec.model_validate({"name": name, "kind": kind, "uri": str(uri), "metric": metric,
                                     **extra})


def evaluation(*suites: SuiteSpec) -> EvaluationSpec:
    return EvaluationSpec(suites=list(suites))
