"""Parse and validate CptRun documents, with errors a person can act on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from .spec import CptRun, CptRunSpec


@dataclass(frozen=True)
class SpecError:
    path: str
    """Dotted field path in wire form, e.g. spec.data.sources[1].weight."""
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidSpec(ValueError):
    def __init__(self, errors: list[SpecError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def _path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif str(item).startswith("function-") or str(item) in {"tagged-union"}:
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _message(err: Mapping[str, Any]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown field (check the spelling; fields are camelCase)"
    if kind == "missing":
        return "required field is missing"
    if kind == "enum" or kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"got {err.get('input')!r}; valid values: {expected}"
    if kind == "value_error":
        return str(msg).removeprefix("Value error, ")
    if "input" in err and not isinstance(err.get("input"), (dict, list)):
        return f"{msg} (got {err.get('input')!r})"
    return str(msg)


def errors_from(exc: ValidationError, prefix: str = "") -> list[SpecError]:
    out = []
    for err in exc.errors():
        path = _path(err["loc"])
        out.append(SpecError(f"{prefix}{'.' if prefix and path else ''}{path}", _message(err)))
    return out


def parse_run(doc: dict[str, Any]) -> CptRun:
    """Validate a whole CptRun document (apiVersion, kind, metadata, spec)."""
    try:
        return CptRun.model_validate(doc)
    except ValidationError as exc:
        raise InvalidSpec(errors_from(exc)) from None


def parse_spec(spec: dict[str, Any]) -> CptRunSpec:
    """Validate only the spec (what the operator receives from the API server)."""
    try:
        return CptRunSpec.model_validate(spec)
    except ValidationError as exc:
        raise InvalidSpec(errors_from(exc, "spec")) from None


def load_run(path: str | Path) -> CptRun:
    """Read a CptRun YAML file; the first document of kind CptRun is used."""
    text = Path(path).read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as exc:
        raise InvalidSpec([SpecError("", f"not valid YAML: {exc}")]) from None
    runs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "CptRun"]
    if not runs:
        raise InvalidSpec([SpecError("kind", "no document with kind: CptRun in the file")])
    return parse_run(runs[0])
