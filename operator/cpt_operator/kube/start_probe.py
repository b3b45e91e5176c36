"""The operator's answers to the start checks (`policy.start_checks` decides): the platform's
allow-lists from its settings, the base's shape read from object storage (once per spec
generation: config.json may sit on S3), and whether Kueue's API is served."""
from __future__ import annotations

from typing import Any, Mapping

from cpt_api.spec import CptRunSpec
from cpt_api.status import Reason
from cpt_api.storage import is_object_store
from ..base_shape import ShapeUnavailable, read_shape
from ..policy.model_shape import ModelShape
from ..policy.tenancy import refusals
from .builders import RunRef
from .runtime import Runtime


class ClusterProbe:
    """For one pass of one run (`policy.start_checks.StartProbe`)."""

    def __init__(self, rt: Runtime, run: RunRef, body: Mapping[str, Any]):
        self.rt, self.run, self.body = rt, run, body

    def tenancy_refusals(self, spec: CptRunSpec) -> list[str]:
        return refusals(spec, self.rt.settings.tenancy)

    def base_shape(self, spec: CptRunSpec) -> ModelShape | str:
        """Read once per (generation, base uri); an unreadable base is reported by an event, once."""
        key = (self.body["metadata"].get("generation"), spec.base_model.uri)
        cached = self.rt.shapes.get(self.run.uid)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            if not is_object_store(spec.base_model.uri):
                # a path names a file inside the pods' image or volumes, not one the operator may read
                raise ShapeUnavailable(f"{spec.base_model.uri} is not object storage; the operator reads "
                                       "only object-store bases")
            found: ModelShape | str = read_shape(spec.base_model)
        except ShapeUnavailable as exc:
            found = str(exc)
            self.rt.emit(self.body, "Warning", Reason.plan_unavailable.value, f"memory not planned: {exc}")
        self.rt.shapes[self.run.uid] = (key, found)
        return found

    def queue_installed(self) -> bool:
        return self.rt.kube.kueue_installed(self.run.namespace)
