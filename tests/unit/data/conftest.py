"""Helpers for the data-pipeline tests: configs over small files, and the tiny tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cpt_api.trainer_config import TrainerConfig


def make_config(run_dir: Path, sources: list[dict[str, Any]], *, seq_len: int = 64,
                boundary: str = "documentMask", strategy: str = "fixed", seed: int = 0,
                curation: dict[str, Any] | None = None, replay_delta: float = 0.0,
                adaptive_max_boost: float = 2.0) -> TrainerConfig:
    """A TrainerConfig whose spec reads `sources` (wire-form dicts); curation off unless asked."""
    spec = {
        "baseModel": {"uri": "unused"},
        "data": {"sources": sources, "strategy": strategy, "seed": seed,
                 "adaptiveMaxBoost": adaptive_max_boost,
                 "curation": curation or {"dedupe": "none", "minChars": 0,
                                          "maxNonPrintable": 1.0, "maxRepeatedLineRatio": 1.0,
                                          "decontaminate": False}},
        "packing": {"seqLen": seq_len, "boundary": boundary},
        "budget": {"steps": 10},
        "schedule": {"warmupSteps": 0},
    }
    return TrainerConfig.model_validate({
        "run": "test", "spec": spec, "runDir": str(run_dir / "run"),
        "checkpointUri": str(run_dir / "run" / "checkpoints"),
        "overrides": {"replayDelta": replay_delta},
    })


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def two_sources(corpora: dict[str, Path]) -> list[dict[str, Any]]:
    """License texts (domain, 0.8) and stdlib JSONL (replay, 0.2)."""
    return [
        {"name": "licenses", "role": "domain", "uri": str(corpora["domain"] / "*.txt"),
         "format": "text", "weight": 0.8},
        {"name": "stdlib", "role": "replay", "uri": str(corpora["replay"] / "stdlib.jsonl"),
         "format": "jsonl", "weight": 0.2},
    ]
