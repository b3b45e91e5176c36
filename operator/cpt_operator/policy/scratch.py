"""Local disk of one pod, planned against `resources.scratch` (pure).

A save to object storage is written by each rank to local files first (DCP's writer, then the
manifest's per-block digests) and uploaded from there; the staging folder is removed once the
upload is done (or failed). One save of a rank holds its shard of the fp32 parameters and of
AdamW's two moments: 12 B/param over the shard count, as the host copy an asynchronous save
stages (`memory_host.STAGED_BYTES_PER_PARAM`). The pod's ranks save at the same moment. A save to
a local path (`cptctl run`) writes in place and stages nothing. Beside it: the work files (logs,
events, libraries' caches under HOME), planned at 1 GiB.
"""
from __future__ import annotations

from cpt_api.quantity import parse_quantity
from cpt_api.spec import CptRunSpec
from cpt_api.storage import is_object_store
from .memory import GIB, estimate, shards
from .memory_host import STAGED_BYTES_PER_PARAM
from .model_shape import ModelShape

WORK_FILES_BYTES = GIB


def scratch_estimate(spec: CptRunSpec, shape: ModelShape) -> tuple[int, int]:
    """(staging of one save of every rank of a pod, work files) in bytes."""
    step = estimate(spec, shape)
    staged = is_object_store(spec.checkpoint.uri or "")
    per_rank = STAGED_BYTES_PER_PARAM * shape.params // shards(step.strategy, step.layout) if staged else 0
    return step.layout.procs_per_node * per_rank, WORK_FILES_BYTES


def scratch_limit(spec: CptRunSpec) -> int | None:
    """`resources.scratch` (one pod's) in bytes, or None when the spec does not say."""
    return parse_quantity(spec.resources.scratch) if spec.resources.scratch else None
