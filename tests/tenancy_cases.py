"""One platform team's allow-lists and runs that keep to them or leave them, shared by the operator's
check (tests/unit/policy/test_tenancy.py) and the chart's admission policy on the real API server
(tests/e2e/test_tenancy.py): the two checks of one rule must agree."""
from __future__ import annotations

from typing import Any

POLICY: dict[str, Any] = {
    "images": ["registry.example.com/ml/"],
    "secrets": ["team-a-s3"],
    "requireS3Secret": True,
    "nodeSelectors": {"pool": ["a100-team-a", "cpu"]},
    "tolerations": ["nvidia.com/gpu"],
    "endpoints": ["https://s3.team-a.example"],
}

ALLOWED_RESOURCES: dict[str, Any] = {
    "image": "registry.example.com/ml/cpt-trainer:1.4",
    "s3SecretRef": "team-a-s3",
    "nodeSelector": {"pool": "cpu"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}

CASES: list[tuple[str, dict[str, Any], str | None]] = [
    # (id, resources, a fragment of the refusal; None: allowed)
    ("all-allowed", ALLOWED_RESOURCES, None),
    ("default-image", {"s3SecretRef": "team-a-s3"}, None),
    ("foreign-image", {**ALLOWED_RESOURCES, "image": "docker.io/someone/trainer:latest"}, "resources.image"),
    ("lookalike-registry", {**ALLOWED_RESOURCES, "image": "registry.example.com.evil.io/ml/t:1"}, "resources.image"),
    ("other-secret", {**ALLOWED_RESOURCES, "s3SecretRef": "team-b-s3"}, "resources.s3SecretRef"),
    ("no-secret", {"image": ALLOWED_RESOURCES["image"]}, "resources.s3SecretRef is required"),
    ("other-pool", {**ALLOWED_RESOURCES, "nodeSelector": {"pool": "h100-team-b"}}, "resources.nodeSelector"),
    ("other-label", {**ALLOWED_RESOURCES, "nodeSelector": {"kubernetes.io/hostname": "gpu-7"}},
     "resources.nodeSelector"),
    ("other-taint", {**ALLOWED_RESOURCES, "tolerations": [{"key": "team-b", "operator": "Exists"}]},
     "resources.tolerations"),
    ("every-taint", {**ALLOWED_RESOURCES, "tolerations": [{"operator": "Exists"}]}, "resources.tolerations"),
]
