"""When a run does not fit: the cheapest change of the spec that makes it fit, as a sentence.

A run is checked against each memory its spec names: every GPU's (`resources.gpuMemory`, against
the step's plan, `memory.py`) and every pod's host memory (`resources.memory`, against the host
plan, `memory_host.py`). A change counts only if every checked memory then holds its plan.
Changes are tried in order of what they cost the run: turning CPU offload off (faster; it fits
when the GPUs can hold the state), sharding the state (fsdp instead of a replica per rank: more
communication, same maths), synchronous checkpoints (no host staging copy; training waits for
each save), selective then full activation checkpointing (about a third, then all, of a forward
pass recomputed), a smaller micro-batch with more gradient accumulation (same tokens per step,
less parallel work), CPU offload (host-device traffic every step; GPU runs only), more host
memory per pod (`resources.memory` as the plan needs it, in whole GiB: only where the spec names
one) and, last, more nodes (more GPUs; the state spread over more ranks). The first single change
that fits wins. If none does, the changes are combined in the same order until the plan fits,
and any change the combination does not need is dropped again; a combination asks for more host
memory only when none fits in the memory the spec asks for.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from cpt_api.base import SpecModel
from cpt_api.quantity import format_bytes
from cpt_api.spec import MAX_NODES, ActivationCheckpointing, CptRunSpec, Sharding
from .memory import GIB, SHARDED, Layout, MemoryPlan, estimate, memory_limit, resolve_strategy
from .memory_host import HostPlan, host_estimate, host_memory_limit
from .model_shape import ModelShape
from .scratch import scratch_estimate, scratch_limit

M = TypeVar("M", bound=SpecModel)
Change = Callable[[CptRunSpec], tuple[str, CptRunSpec]]
"""Given a spec: what the user sets (`field: value`), and the spec with it set."""


@dataclass(frozen=True, slots=True)
class Usage:
    """One checked memory: what the plan uses of it, and what dominates."""

    what: str
    """`per-GPU`, `per-process` (a CPU run's step) or `host memory per pod`."""
    used: int
    limit: int
    detail: str
    """Where the bytes go: layout and largest parts."""

    @property
    def fits(self) -> bool:
        return self.used <= self.limit

    def __str__(self) -> str:
        return f"{self.what} {format_bytes(self.used)} of {format_bytes(self.limit)}"

    def problem(self) -> str:
        return f"{self} does not fit ({self.detail})"


def device_usage(plan: MemoryPlan, limit: int) -> Usage:
    lay = plan.layout
    return Usage("per-GPU" if lay.gpu else "per-process", plan.total, limit,
                 f"{plan.strategy} over {lay.world} {'GPUs' if lay.gpu else 'processes'}; "
                 f"largest: {', '.join(plan.largest())}")


def scratch_usage(spec: CptRunSpec, shape: ModelShape, limit: int) -> Usage:
    staging, work = scratch_estimate(spec, shape)
    lay = Layout.of(spec)
    return Usage("scratch disk per pod", staging + work, limit,
                 f"a save's staging {format_bytes(staging)} ({lay.procs_per_node} rank(s)) + work files "
                 f"{format_bytes(work)}")


def host_usage(plan: HostPlan, limit: int) -> Usage:
    return Usage("host memory per pod", plan.total, limit,
                 f"{plan.layout.procs_per_node} rank(s) × {format_bytes(plan.rank)} while {plan.peak_moment} "
                 f"+ launcher {format_bytes(plan.launcher)}; largest a rank: {', '.join(plan.largest())}")


def checked(spec: CptRunSpec) -> bool:
    """Whether the spec names any memory (or disk) to plan against."""
    return any(x is not None for x in (memory_limit(spec), host_memory_limit(spec), scratch_limit(spec)))


def usages(spec: CptRunSpec, shape: ModelShape) -> list[Usage]:
    """Each memory the spec names against its plan: the GPU's, the pod's host memory, its disk."""
    found = []
    gpu, host, disk = memory_limit(spec), host_memory_limit(spec), scratch_limit(spec)
    if gpu is not None:
        found.append(device_usage(estimate(spec, shape), gpu))
    if host is not None:
        found.append(host_usage(host_estimate(spec, shape), host))
    if disk is not None:
        found.append(scratch_usage(spec, shape, disk))
    return found


@dataclass(frozen=True, slots=True)
class Fix:
    changes: tuple[str, ...]
    usages: tuple[Usage, ...]

    def sentence(self) -> str:
        """e.g. `set training.parallelism.strategy: fsdp (per-GPU 31.2 GiB of 80.0 GiB)`."""
        return f"set {', '.join(self.changes)} ({', '.join(map(str, self.usages))})"


def updated(model: M, path: str, **values: Any) -> M:
    """A copy of `model` with the fields at dotted `path` set (nested models copied, not shared)."""
    if not path:
        return model.model_copy(update=values)
    head, _, rest = path.partition(".")
    return model.model_copy(update={head: updated(getattr(model, head), rest, **values)})


def smallest_fix(spec: CptRunSpec, shape: ModelShape) -> Fix | None:
    """The first single change that fits, else the first fitting combination (first within the
    spec's host memory, then with more), else None."""
    for change in _single_changes(spec, shape):
        fix = _try(spec, shape, [change])
        if fix is not None:
            return fix
    more_memory = [_more_memory(shape)] if host_memory_limit(spec) is not None else []
    return _combination(spec, shape, []) or (_combination(spec, shape, more_memory) if more_memory else None)


def _try(spec: CptRunSpec, shape: ModelShape, changes: list[Change]) -> Fix | None:
    labels = []
    for change in changes:
        label, spec = change(spec)
        labels.append(label)
    found = usages(spec, shape)
    return Fix(tuple(labels), tuple(found)) if all(u.fits for u in found) else None


def _single_changes(spec: CptRunSpec, shape: ModelShape) -> Iterator[Change]:
    layout, p = Layout.of(spec), spec.training.parallelism
    strategy, host = resolve_strategy(spec, layout), host_memory_limit(spec) is not None
    if layout.gpu and p.cpu_offload and strategy in SHARDED:
        yield _offload(False)
    if strategy != "fsdp" and layout.world > 1:
        yield _strategy_fsdp()
    if host and spec.checkpoint.asynchronous:
        yield _synchronous()
    if p.activation_checkpointing == ActivationCheckpointing.none:
        yield _checkpointing(ActivationCheckpointing.selective)
    if p.activation_checkpointing != ActivationCheckpointing.full:
        yield _checkpointing(ActivationCheckpointing.full)
    yield from _micro_batches(spec)
    if layout.gpu and strategy in SHARDED and not p.cpu_offload:
        yield _offload(True)
    if host:
        yield _more_memory(shape)
    if scratch_limit(spec) is not None:
        yield _more_scratch(shape)
    if strategy != "ddp":
        yield from _more_nodes(spec)


def _combination(spec: CptRunSpec, shape: ModelShape, last: list[Change]) -> Fix | None:
    """Add the changes one kind at a time, each kind as far as it goes, until the plan fits
    (with the `last` changes made after them); then drop what the fit does not need."""
    chosen: list[Change] = []
    for kind in _kinds(spec):
        for change in kind:
            if _try(spec, shape, [*chosen, change, *last]) is not None:
                return _needed(spec, shape, [*chosen, change], last)
        chosen.extend(kind[-1:])  # the strongest of this kind stays in the combination
    return None


def _needed(spec: CptRunSpec, shape: ModelShape, changes: list[Change], last: list[Change]) -> Fix | None:
    """`changes` less each one (in order) that the others fit without."""
    for change in list(changes):
        rest = [c for c in changes if c is not change]
        if rest and _try(spec, shape, [*rest, *last]) is not None:
            changes = rest
    return _try(spec, shape, [*changes, *last])


def _kinds(spec: CptRunSpec) -> list[list[Change]]:
    layout, p = Layout.of(spec), spec.training.parallelism
    strategy, host = resolve_strategy(spec, layout), host_memory_limit(spec) is not None
    replicated = strategy not in SHARDED and layout.world > 1
    return [[_offload(False)] if layout.gpu and p.cpu_offload and strategy in SHARDED else [],
            [_strategy_fsdp()] if replicated else [],
            [_synchronous()] if host and spec.checkpoint.asynchronous else [],
            [_checkpointing(ActivationCheckpointing.full)],
            list(_micro_batches(spec)),
            [_offload(True)] if layout.gpu and not p.cpu_offload else [],
            list(_more_nodes(spec))]


def _setter(label: str, path: str, **values: Any) -> Change:
    def apply(spec: CptRunSpec) -> tuple[str, CptRunSpec]:
        return label, updated(spec, path, **values)
    return apply


def _strategy_fsdp() -> Change:
    return _setter("training.parallelism.strategy: fsdp", "training.parallelism", strategy=Sharding.fsdp)


def _checkpointing(mode: ActivationCheckpointing) -> Change:
    return _setter(f"training.parallelism.activationCheckpointing: {mode.value}", "training.parallelism",
                   activation_checkpointing=mode)


def _offload(on: bool) -> Change:
    return _setter(f"training.parallelism.cpuOffload: {str(on).lower()}", "training.parallelism",
                   cpu_offload=on)


def _synchronous() -> Change:
    return _setter("checkpoint.asynchronous: false", "checkpoint", asynchronous=False)


def _micro_batches(spec: CptRunSpec) -> Iterator[Change]:
    """Halvings of the micro-batch, with accumulation raised to keep the tokens per step."""
    t, factor = spec.training, 2
    while t.micro_batch_size // factor >= 1:
        mb, acc = t.micro_batch_size // factor, t.grad_accumulation * factor
        yield _setter(f"training.microBatchSize: {mb}, training.gradAccumulation: {acc}", "training",
                      micro_batch_size=mb, grad_accumulation=acc)
        factor *= 2


def _more_nodes(spec: CptRunSpec) -> Iterator[Change]:
    nodes = spec.resources.nodes * 2
    while nodes <= MAX_NODES:
        yield _setter(f"resources.nodes: {nodes}", "resources", nodes=nodes)
        nodes *= 2


def _more_memory(shape: ModelShape) -> Change:
    """`resources.memory` as the host plan of the spec it is applied to needs, in whole GiB."""
    def apply(spec: CptRunSpec) -> tuple[str, CptRunSpec]:
        memory = f"{-(-host_estimate(spec, shape).total // GIB)}Gi"
        return f"resources.memory: {memory}", updated(spec, "resources", memory=memory)
    return apply


def _more_scratch(shape: ModelShape) -> Change:
    """`resources.scratch` as the plan of the spec it is applied to needs, in whole GiB."""
    def apply(spec: CptRunSpec) -> tuple[str, CptRunSpec]:
        scratch = f"{-(-sum(scratch_estimate(spec, shape)) // GIB)}Gi"
        return f"resources.scratch: {scratch}", updated(spec, "resources", scratch=scratch)
    return apply


def wont_fit(spec: CptRunSpec, shape: ModelShape) -> str | None:
    """None when the run fits every memory its spec names; else what does not, and the smallest
    change that fits."""
    failing = [u for u in usages(spec, shape) if not u.fits]
    if not failing:
        return None
    head = "; ".join(u.problem() for u in failing)
    fix = smallest_fix(spec, shape)
    if fix is None:
        return f"{head}; no change tried makes it fit (sharding, checkpointing, micro-batch 1, " \
               f"CPU offload, up to {MAX_NODES} nodes): use GPUs with more memory or a smaller base"
    return f"{head}; smallest fix: {fix.sentence()}"
