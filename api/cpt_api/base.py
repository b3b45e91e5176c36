"""Shared base for every CptRun model: camelCase on the wire, snake_case in Python.

Specs are written by people in YAML; an unknown key is almost always a typo, so every model
forbids extra fields and the error names the field path.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class SpecModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )

    def dump(self) -> dict[str, Any]:
        """The wire form (camelCase keys, defaults included, JSON-compatible)."""
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)
