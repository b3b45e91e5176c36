"""`training.attention: auto` picks a kernel whose document mask is not a dense T x T matrix on
GPU, and keeps sdpa on CPU (where flex_attention has no backward)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from cpt_trainer.model import attention_backend


@pytest.mark.parametrize("requested,device,expected", [
    ("auto", "cpu", "sdpa"),
    ("eager", "cpu", "eager"),
    ("flex_attention", "cuda", "flex_attention"),
], ids=["auto on CPU is sdpa", "an explicit choice is kept", "an explicit GPU choice is kept"])
def test_explicit_choices_and_cpu(requested: str, device: str, expected: str) -> None:
    assert attention_backend(requested, torch.device(device)) == expected


def test_auto_on_gpu_avoids_a_dense_document_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert attention_backend("auto", torch.device("cuda")) == "flex_attention"
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert attention_backend("auto", torch.device("cuda")) == "flash_attention_2"
