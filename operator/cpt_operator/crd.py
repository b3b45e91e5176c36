"""Generate the CptRun CustomResourceDefinition from the pydantic models.

The models are the source of truth; this turns their JSON Schema into a *structural* OpenAPI v3
schema (no $ref, no anyOf-with-null, no tuple schemas, OpenAPI-style exclusive bounds) and adds
the CEL rules of `cel_rules.py`. Defaults are left to the models, so a stored object is what
the user wrote; the CEL rules substitute the models' defaults where they read optional fields.
"""
from __future__ import annotations

import copy
from typing import Any

from .cel_rules import RULES
from cpt_api.spec import GROUP, KIND, PLURAL, VERSION, CptRunSpec
from cpt_api.status import CptRunStatus

Schema = dict[str, Any]
_DROP = {"title", "default", "discriminator"}


def _resolve(node: Any, defs: dict[str, Schema]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve({**target, **extra}, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _nullable(node: Schema) -> Schema:
    options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
    if len(options) != 1:
        raise ValueError(f"cannot express anyOf {options} structurally")
    return {**options[0], **node}


def _bounds(node: Schema) -> None:
    for key, base in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(key), (int, float)) and not isinstance(node.get(key), bool):
            node[base] = node.pop(key)
            node[key] = True


def _structural(node: Any) -> Any:
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: v for k, v in node.items() if k not in _DROP}
    if "anyOf" in node:
        node = {k: v for k, v in _nullable(node).items() if k not in _DROP}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "prefixItems" in node:  # fixed-length tuples (betas) become bounded arrays
        items = node.pop("prefixItems")
        node.update(items=items[0], minItems=len(items), maxItems=len(items))
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]  # forbidden in structural schemas; pruning covers it
    _bounds(node)
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    return {k: _structural(v) for k, v in node.items()}


def _attach_rules(schema: Schema) -> None:
    for rule in RULES:
        node = schema
        for part in rule.path:
            node = node["items"] if part == "[]" else node["properties"][part]
        entry = {"rule": rule.rule, "message": rule.message}
        if rule.reason:
            entry["reason"] = rule.reason
        node.setdefault("x-kubernetes-validations", []).append(entry)


def openapi_schema(model: type) -> Schema:
    raw = model.model_json_schema(by_alias=True)  # type: ignore[attr-defined]
    defs = raw.pop("$defs", {})
    return _structural(_resolve(raw, defs))  # type: ignore[no-any-return]


def _printer_columns() -> list[Schema]:
    def col(name: str, path: str, typ: str = "string", **kw: Any) -> Schema:
        return {"name": name, "jsonPath": path, "type": typ, **kw}

    return [
        col("Phase", ".status.phase"),
        col("Attempt", ".status.attempt", "integer"),
        col("Step", ".status.step", "integer"),
        col("Tokens", ".status.tokens", "integer"),
        col("Checkpoint", ".status.lastCheckpoint"),
        col("Rollbacks", ".status.rollbacks", "integer"),
        col("Admission", '.status.conditions[?(@.type=="Admitted")].reason'),
        # what holds an attempt's pods back (ImagePullFailed, Unschedulable...), TrainersRunning once not
        col("Start", '.status.conditions[?(@.type=="Started")].reason'),
        col("Age", ".metadata.creationTimestamp", "date"),
        col("Message", ".status.message", priority=1),
    ]


def crd() -> Schema:
    spec = openapi_schema(CptRunSpec)
    _attach_rules({"properties": {"spec": spec}})
    status = openapi_schema(CptRunStatus)
    root = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL,
                      "singular": KIND.lower(), "shortNames": ["cpt"], "categories": ["ml"]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": _printer_columns(),
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


def crd_yaml() -> str:
    import yaml

    header = "# Generated from cpt_api by `cptctl crd`; do not edit by hand.\n"
    body: str = yaml.safe_dump(crd(), sort_keys=False, width=100)
    return header + body
