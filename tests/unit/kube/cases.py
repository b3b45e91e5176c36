"""A CptRun as a cluster would run it: two H100 nodes, one gate on general perplexity."""
from __future__ import annotations

from typing import Any

from cpt_api.spec import CptRunSpec
from cpt_operator.kube.builders import RunRef

RUN = RunRef(name="legal-7b", namespace="ml", uid="5f0c-uid")


def spec_doc(**resources: Any) -> dict[str, Any]:
    return {
        "baseModel": {"uri": "s3://models/base", "format": "hf"},
        "data": {"sources": [{"name": "legal", "role": "domain", "uri": "s3://d/legal/*.jsonl", "weight": 0.8},
                             {"name": "web", "role": "replay", "uri": "s3://d/web/*.jsonl", "weight": 0.2}]},
        "budget": {"steps": 1000},
        "schedule": {"warmupSteps": 10},
        "checkpoint": {"uri": "s3://ckpt/runs/legal-7b/", "every": 50},
        "evaluation": {"every": 50, "suites": [
            {"name": "legal", "kind": "domain", "uri": "s3://e/legal.jsonl"},
            {"name": "general", "kind": "general", "uri": "s3://e/general.jsonl"}]},
        "gates": [{"name": "general-regression", "suite": "general", "threshold": 0.1,
                   "tune": {"lrFactor": 0.5, "replayDelta": 0.1}}],
        "resources": {"nodes": 2, "gpusPerNode": 8, "nodeSelector": {"pool": "h100"},
                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                      "cpu": "90", "memory": "900Gi", "sharedMemory": "64Gi", "s3SecretRef": "s3-creds",
                      **resources},
    }


def build_spec(**resources: Any) -> CptRunSpec:
    return CptRunSpec.model_validate(spec_doc(**resources))
