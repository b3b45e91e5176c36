"""The memory check as `cptctl plan`, `cptctl run` and the operator use it: shape in, words out.

`plan_lines` is the table `cptctl plan` prints; `refusal` is the one check the local runner and
the operator run before starting an attempt (the operator caches the shape per spec generation).
"""
from __future__ import annotations

from .api.quantity import format_bytes
from .api.spec import CptRunSpec
from .base_shape import read_shape
from .policy.memory import MemoryPlan, dtypes, estimate, memory_limit
from .policy.memory_fix import usage, wont_fit
from .policy.model_shape import ModelShape


def headline(spec: CptRunSpec, shape: ModelShape, plan: MemoryPlan) -> str:
    lay, t = plan.layout, spec.training
    where = f"{lay.nodes} node(s) × {lay.procs_per_node} {'GPU(s)' if lay.gpu else 'process(es)'}"
    bits = 8 * dtypes(spec, plan.strategy, lay.gpu).compute
    device = "per GPU" if lay.gpu else "host memory per process (CPU run: fp32)"
    return (f"{shape.params / 1e9:.2f} B parameters on {where}, {plan.strategy}, {bits}-bit compute, "
            f"{spec.packing.seq_len} tokens × micro-batch {t.micro_batch_size}, "
            f"checkpointing {t.parallelism.activation_checkpointing.value}: {device}")


def plan_lines(spec: CptRunSpec, shape: ModelShape, limit: int | None) -> list[str]:
    """The plan by part, then the total against the limit (when there is one)."""
    plan = estimate(spec, shape)
    lines = [headline(spec, shape, plan)]
    lines += [f"  {name:<12}{format_bytes(size):>12}" for name, size in plan.parts().items()]
    verdict = "" if limit is None else f"  ({usage(plan, limit)}: {'fits' if plan.fits(limit) else 'does NOT fit'})"
    lines.append(f"  {'total':<12}{format_bytes(plan.total):>12}{verdict}")
    return lines


def refusal(spec: CptRunSpec, shape: ModelShape | None = None) -> str | None:
    """Why the run cannot start (with the smallest fix), or None when it fits or has no
    `resources.gpuMemory`. Reads the base's shape unless given; raises ShapeUnavailable."""
    limit = memory_limit(spec)
    if limit is None:
        return None
    return wont_fit(spec, shape or read_shape(spec.base_model), limit)


def resized(spec: CptRunSpec, nodes: int | None = None, gpus_per_node: int | None = None,
            gpu_memory: str | None = None, nproc_per_node: int | None = None) -> CptRunSpec:
    """The spec on another layout or GPU (`cptctl plan --nodes/--gpus-per-node/--gpu-memory`,
    `cptctl run --nproc`), validated again: hsdp on one node, say, is refused as the spec is."""
    doc = spec.dump()
    given = {"nodes": nodes, "gpusPerNode": gpus_per_node, "gpuMemory": gpu_memory,
             "nprocPerNode": nproc_per_node}
    doc["resources"].update({k: v for k, v in given.items() if v is not None})
    return CptRunSpec.model_validate(doc)
