"""The start checks, one case a row: which check decides, in which order, and what the probe is
asked (a backend reads nothing a check before it made unnecessary)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from cpt_api.spec import CptRunSpec
from cpt_api.status import Reason
from cpt_operator.policy.model_shape import ModelShape
from cpt_operator.policy.start_checks import MemoryNote, check_root, check_start, pin_failure, pins_hold
from tests.unit.kube.cases import spec_doc
from tests.unit.policy.memory_cases import LLAMA3_8B_CONFIG


@dataclass
class Probe:
    refusals: list[str] = field(default_factory=list)
    shape: ModelShape | str = field(default_factory=lambda: ModelShape.from_hf_config(LLAMA3_8B_CONFIG))
    queue: bool = True
    asked: list[str] = field(default_factory=list)

    def tenancy_refusals(self, spec: CptRunSpec) -> list[str]:
        self.asked.append("tenancy")
        return self.refusals

    def base_shape(self, spec: CptRunSpec) -> ModelShape | str:
        self.asked.append("shape")
        return self.shape

    def queue_installed(self) -> bool:
        self.asked.append("queue")
        return self.queue


def _spec(**resources: Any) -> CptRunSpec:
    doc = spec_doc(**{"nodes": 1, "gpuMemory": "80Gi", **resources})
    doc["packing"] = {"seqLen": 4096}
    doc["training"] = {"microBatchSize": 1, "parallelism": {"strategy": "fsdp"}}
    return CptRunSpec.model_validate(doc)


CASES = [
    ("outside the allow-lists: refused, nothing else read",
     {}, {"refusals": ["resources.image x is not allowed"]}, Reason.not_allowed, None, ["tenancy"]),
    ("no memory named: the base is not read",
     {"gpuMemory": None, "memory": None}, {}, None, None, ["tenancy"]),
    ("fits: the plan is recorded",
     {}, {}, None, True, ["tenancy", "shape"]),
    ("too little GPU memory: refused with the fix",
     {"gpuMemory": "24Gi"}, {}, Reason.wont_fit, None, ["tenancy", "shape"]),
    ("too little pod memory: refused with the fix",
     {"memory": "64Gi"}, {}, Reason.wont_fit, None, ["tenancy", "shape"]),
    ("an unreadable base: reported, not refused",
     {}, {"shape": "no config.json"}, None, False, ["tenancy", "shape"]),
    ("a queue without Kueue: refused, the plan still recorded",
     {"queue": "team-a"}, {"queue": False}, Reason.kueue_not_installed, True, ["tenancy", "shape", "queue"]),
    ("a queue with Kueue: starts",
     {"queue": "team-a"}, {}, None, True, ["tenancy", "shape", "queue"]),
]


@pytest.mark.parametrize("resources, probe, refused, planned, asked", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_each_start_check_decides_in_its_turn(resources: dict[str, Any], probe: dict[str, Any],
                                              refused: Reason | None, planned: bool | None,
                                              asked: list[str]) -> None:
    p = Probe(**probe)
    check = check_start(_spec(**resources), p)
    assert (check.refusal.reason if check.refusal else None) == refused
    assert (check.memory.planned if check.memory else None) == planned
    assert p.asked == asked
    if refused == Reason.wont_fit:
        assert "smallest fix" in check.refusal.message  # type: ignore[union-attr]
    if refused == Reason.kueue_not_installed:
        assert "resources.queue is 'team-a'" in check.refusal.message  # type: ignore[union-attr]


def test_an_unreadable_base_is_named_in_the_memory_note() -> None:
    check = check_start(_spec(), Probe(shape="s3://b/config.json: no such key"))
    assert check.memory == MemoryNote(False, Reason.plan_unavailable,
                                      "memory not planned: s3://b/config.json: no such key")


def test_the_root_and_the_pins() -> None:
    assert check_root(None) is None
    refused = check_root("checkpoint.uri s3://x is taken")
    assert refused is not None and refused.reason == Reason.checkpoint_uri_in_use
    assert pins_hold(None) is None
    why = pin_failure(["attempt-001/step-00000010"], OSError("slow down"))
    hold = pins_hold(why)
    assert hold is not None and hold.reason == Reason.pin_failed
    assert hold.message.startswith("pinning attempt-001/step-00000010 failed (retrying)")
