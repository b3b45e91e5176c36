"""When a run does not fit: the cheapest change of the spec that makes it fit, as a sentence.

Changes are tried in order of what they cost the run: sharding the state (fsdp instead of a
replica per rank: more communication, same maths), selective then full activation checkpointing
(about a third, then all, of a forward pass recomputed), a smaller micro-batch with more
gradient accumulation (same tokens per step, less parallel work), CPU offload (host-device
traffic every step) and, last, more nodes (more GPUs). The first single change that fits wins;
if none does, the changes are combined in the same order until the plan fits.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from ..api.base import SpecModel
from ..api.quantity import format_bytes
from ..api.spec import MAX_NODES, ActivationCheckpointing, CptRunSpec, Sharding
from .memory import SHARDED, Layout, MemoryPlan, estimate, resolve_strategy
from .model_shape import ModelShape

M = TypeVar("M", bound=SpecModel)
Change = tuple[str, Callable[[CptRunSpec], CptRunSpec]]
"""(what the user sets, as `field: value`, and the spec with it set)."""


@dataclass(frozen=True, slots=True)
class Fix:
    changes: tuple[str, ...]
    plan: MemoryPlan

    def sentence(self, limit: int) -> str:
        """e.g. `set training.parallelism.strategy: fsdp (per-GPU 31.2 GiB of 80.0 GiB)`."""
        return f"set {', '.join(self.changes)} ({usage(self.plan, limit)})"


def usage(plan: MemoryPlan, limit: int) -> str:
    return f"{'per-GPU' if plan.layout.gpu else 'per-process'} {format_bytes(plan.total)} of {format_bytes(limit)}"


def updated(model: M, path: str, **values: Any) -> M:
    """A copy of `model` with the fields at dotted `path` set (nested models copied, not shared)."""
    if not path:
        return model.model_copy(update=values)
    head, _, rest = path.partition(".")
    return model.model_copy(update={head: updated(getattr(model, head), rest, **values)})


def smallest_fix(spec: CptRunSpec, shape: ModelShape, limit: int) -> Fix | None:
    """The first single change that fits, else the first fitting combination, else None."""
    for change in _single_changes(spec):
        fix = _try(spec, shape, limit, [change])
        if fix is not None:
            return fix
    return _combination(spec, shape, limit)


def _try(spec: CptRunSpec, shape: ModelShape, limit: int, changes: list[Change]) -> Fix | None:
    for _, apply in changes:
        spec = apply(spec)
    plan = estimate(spec, shape)
    return Fix(tuple(label for label, _ in changes), plan) if plan.fits(limit) else None


def _single_changes(spec: CptRunSpec) -> Iterator[Change]:
    strategy = resolve_strategy(spec, Layout.of(spec))
    if strategy != "fsdp" and Layout.of(spec).world > 1:
        yield _strategy_fsdp()
    ac = spec.training.parallelism.activation_checkpointing
    if ac == ActivationCheckpointing.none:
        yield _checkpointing(ActivationCheckpointing.selective)
    if ac != ActivationCheckpointing.full:
        yield _checkpointing(ActivationCheckpointing.full)
    yield from _micro_batches(spec)
    if strategy in SHARDED and not spec.training.parallelism.cpu_offload:
        yield _offload()
    if strategy != "ddp":
        yield from _more_nodes(spec)


def _combination(spec: CptRunSpec, shape: ModelShape, limit: int) -> Fix | None:
    """Add the changes one kind at a time, each kind as far as it goes, until the plan fits."""
    chosen: list[Change] = []
    for kind in _kinds(spec):
        for change in kind:
            fix = _try(spec, shape, limit, [*chosen, change])
            if fix is not None:
                return fix
        chosen.extend(kind[-1:])  # the strongest of this kind stays in the combination
    return None


def _kinds(spec: CptRunSpec) -> list[list[Change]]:
    layout = Layout.of(spec)
    replicated = resolve_strategy(spec, layout) not in SHARDED and layout.world > 1
    return [[_strategy_fsdp()] if replicated else [],
            [_checkpointing(ActivationCheckpointing.full)],
            list(_micro_batches(spec)),
            [] if spec.training.parallelism.cpu_offload else [_offload()],
            list(_more_nodes(spec))]


def _setter(path: str, **values: Any) -> Callable[[CptRunSpec], CptRunSpec]:
    def apply(spec: CptRunSpec) -> CptRunSpec:
        return updated(spec, path, **values)
    return apply


def _strategy_fsdp() -> Change:
    return ("training.parallelism.strategy: fsdp",
            _setter("training.parallelism", strategy=Sharding.fsdp))


def _checkpointing(mode: ActivationCheckpointing) -> Change:
    return (f"training.parallelism.activationCheckpointing: {mode.value}",
            _setter("training.parallelism", activation_checkpointing=mode))


def _offload() -> Change:
    return ("training.parallelism.cpuOffload: true",
            _setter("training.parallelism", cpu_offload=True))


def _micro_batches(spec: CptRunSpec) -> Iterator[Change]:
    """Halvings of the micro-batch, with accumulation raised to keep the tokens per step."""
    t, factor = spec.training, 2
    while t.micro_batch_size // factor >= 1:
        mb, acc = t.micro_batch_size // factor, t.grad_accumulation * factor
        yield (f"training.microBatchSize: {mb}, training.gradAccumulation: {acc}",
               _setter("training", micro_batch_size=mb, grad_accumulation=acc))
        factor *= 2


def _more_nodes(spec: CptRunSpec) -> Iterator[Change]:
    nodes = spec.resources.nodes * 2
    while nodes <= MAX_NODES:
        yield f"resources.nodes: {nodes}", _setter("resources", nodes=nodes)
        nodes *= 2


def wont_fit(spec: CptRunSpec, shape: ModelShape, limit: int) -> str | None:
    """None when the run fits in `limit` bytes per rank; else why not and the smallest fix."""
    plan = estimate(spec, shape)
    if plan.fits(limit):
        return None
    unit = "GPUs" if plan.layout.gpu else "processes"
    head = (f"{usage(plan, limit)} does not fit ({plan.strategy} over {plan.layout.world} {unit}; "
            f"largest: {', '.join(plan.largest())})")
    fix = smallest_fix(spec, shape, limit)
    if fix is None:
        return f"{head}; no change tried makes it fit (sharding, checkpointing, micro-batch 1, " \
               f"CPU offload, up to {MAX_NODES} nodes): use GPUs with more memory or a smaller base"
    return f"{head}; smallest fix: {fix.sentence(limit)}"
