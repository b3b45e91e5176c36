"""The memory check as `cptctl plan`, `cptctl run` and the operator use it: shape in, words out.

`plan_lines` is the table `cptctl plan` prints; `refusal` is the one check the local runner and
the operator run before starting an attempt (the operator caches the shape per spec generation).
"""
from __future__ import annotations

from cpt_api.quantity import format_bytes
from cpt_api.spec import CptRunSpec
from .base_shape import read_shape
from .policy.memory import MemoryPlan, dtypes, estimate, memory_limit
from .policy.memory_fix import Usage, checked, device_usage, host_usage, scratch_usage, wont_fit
from .policy.memory_host import HostPlan, host_estimate, host_memory_limit
from .policy.model_shape import ModelShape
from .policy.scratch import scratch_estimate, scratch_limit

MOMENTS = ("loading", "training")


def headline(spec: CptRunSpec, shape: ModelShape, plan: MemoryPlan) -> str:
    lay, t = plan.layout, spec.training
    where = f"{lay.nodes} node(s) × {lay.procs_per_node} {'GPU(s)' if lay.gpu else 'process(es)'}"
    bits = 8 * dtypes(spec, plan.strategy, lay.gpu).compute
    device = "per GPU" if lay.gpu else "the step, in host memory per process (CPU run: fp32)"
    return (f"{shape.params / 1e9:.2f} B parameters on {where}, {plan.strategy}, {bits}-bit compute, "
            f"{spec.packing.seq_len} tokens × micro-batch {t.micro_batch_size}, "
            f"checkpointing {t.parallelism.activation_checkpointing.value}: {device}")


def plan_lines(spec: CptRunSpec, shape: ModelShape) -> list[str]:
    """The step's plan by part, then the host plan by part and moment; each total against the
    memory the spec names (when it names one)."""
    plan, limit = estimate(spec, shape), memory_limit(spec)
    lines = [headline(spec, shape, plan)]
    lines += [f"  {name:<12}{format_bytes(size):>12}" for name, size in plan.parts().items()]
    verdict = "" if limit is None else _verdict(device_usage(plan, limit))
    lines.append(f"  {'total':<12}{format_bytes(plan.total):>12}{verdict}")
    return lines + host_lines(host_estimate(spec, shape), host_memory_limit(spec)) + scratch_lines(spec, shape)


def scratch_lines(spec: CptRunSpec, shape: ModelShape) -> list[str]:
    """The pod's local disk: one save's staging (object storage only) and the work files."""
    staging, work = scratch_estimate(spec, shape)
    limit = scratch_limit(spec)
    verdict = "" if limit is None else _verdict(scratch_usage(spec, shape, limit))
    return ["scratch disk per pod (resources.scratch):",
            f"  {'staging':<12}{format_bytes(staging) if staging else '-':>12}"
            + ("" if staging else "  (checkpoints written in place)"),
            f"  {'work':<12}{format_bytes(work):>12}",
            f"  {'pod':<12}{format_bytes(staging + work):>12}{verdict}"]


def host_lines(plan: HostPlan, limit: int | None) -> list[str]:
    """The parts a rank has at either moment (`-`: not at that one), its total at each, then the
    pod: every rank at its peak and torchrun's launcher."""
    names = [n for n in {**plan.loading, **plan.training} if plan.loading.get(n) or plan.training.get(n)]
    lines = ["host memory per rank (training: from the first checkpoint on):",
             f"  {'':<12}{'loading':>12}{'training':>12}"]
    for name in names:
        cells = [getattr(plan, m).get(name, 0) for m in MOMENTS]
        lines.append(f"  {name:<12}" + "".join(f"{format_bytes(c) if c else '-':>12}" for c in cells))
    lines.append(f"  {'rank':<12}" + "".join(f"{format_bytes(sum(getattr(plan, m).values())):>12}" for m in MOMENTS))
    verdict = "" if limit is None else _verdict(host_usage(plan, limit))
    lines.append(f"  {'pod':<12}{format_bytes(plan.total):>12}  = {plan.layout.procs_per_node} × "
                 f"{format_bytes(plan.rank)} + launcher {format_bytes(plan.launcher)}{verdict}")
    return lines


def _verdict(usage: Usage) -> str:
    return f"  ({usage}: {'fits' if usage.fits else 'does NOT fit'})"


def refusal(spec: CptRunSpec, shape: ModelShape | None = None) -> str | None:
    """Why the run cannot start (with the smallest fix), or None when it fits or names no memory
    (`resources.gpuMemory`, `resources.memory`). Reads the base's shape unless given; raises
    ShapeUnavailable."""
    if not checked(spec):
        return None
    return wont_fit(spec, shape or read_shape(spec.base_model))


def resized(spec: CptRunSpec, nodes: int | None = None, gpus_per_node: int | None = None,
            gpu_memory: str | None = None, nproc_per_node: int | None = None,
            memory: str | None = None) -> CptRunSpec:
    """The spec on another layout, GPU or pod memory (`cptctl plan --nodes/--gpus-per-node/
    --gpu-memory/--memory`, `cptctl run --nproc`), validated again: hsdp on one node, say, is
    refused as the spec is."""
    doc = spec.dump()
    given = {"nodes": nodes, "gpusPerNode": gpus_per_node, "gpuMemory": gpu_memory,
             "nprocPerNode": nproc_per_node, "memory": memory}
    doc["resources"].update({k: v for k, v in given.items() if v is not None})
    return CptRunSpec.model_validate(doc)
