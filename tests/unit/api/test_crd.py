"""The CRD in crds/ is generated from the models and structural."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cpt_operator.crd import crd, crd_yaml

ROOT = Path(__file__).parents[3]


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.items():
            out += _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _walk(value, f"{path}[{i}]")
    return out


def test_checked_in_crd_is_up_to_date() -> None:
    checked_in = (ROOT / "crds" / "cptrun.yaml").read_text()
    assert checked_in == crd_yaml(), "crds/cptrun.yaml is stale: run `cptctl crd -o crds/cptrun.yaml`"


def test_schema_is_structural() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "prefixItems", "const", "title"):
            assert banned not in node, f"{banned} at {path}"
        if "properties" in node or "items" in node:
            assert node.get("type") in {"object", "array"}, path


def test_status_and_printer_columns() -> None:
    version = crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names[:9] == ["Phase", "Attempt", "Step", "Tokens", "Checkpoint", "Rollbacks", "Admission", "Start",
                         "Age"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Admission"] == '.status.conditions[?(@.type=="Admitted")].reason'
    assert columns["Start"] == '.status.conditions[?(@.type=="Started")].reason'
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"phase", "conditions", "observedGeneration", "history", "frontier"} <= set(status)


def test_generated_yaml_parses() -> None:
    assert yaml.safe_load(crd_yaml())["metadata"]["name"] == "cptruns.cpt.mlops.dev"
