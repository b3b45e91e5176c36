"""How model state is spread over the ranks: one process, DDP replicas, or FSDP2 shards.

`training.parallelism.strategy` picks it (auto: fsdp when there is more than one rank, because a
7B+ base replicated in fp32 AdamW needs ~16 bytes a parameter on every GPU; a plain module for
a single process). FSDP2 (`fully_shard`) wraps each decoder block and then the root, so only one
or two blocks are ever unsharded at once; hsdp uses a 2-D mesh (replicate across nodes, shard
within a node) so the per-step all-gathers stay on the intra-node links.

On GPU with bf16 precision the blocks compute in bf16 while the sharded master weights, the
gradient reduction and AdamW stay fp32 (`MixedPrecisionPolicy`). Activation checkpointing wraps
blocks before they are sharded (full: every block, selective: every other one).

Everything the loop does differently per strategy goes through `Parallel`: the module to call,
gradient sync during accumulation, clipping, and freeing what a forward-only pass left gathered
(a sharded model's forward is a collective: evaluation runs on every rank, `evals/sharing.py`).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy,
                                    OffloadPolicy, fully_shard)
from torch.nn.parallel import DistributedDataParallel

from cpt_api.spec import ActivationCheckpointing, ParallelismSpec, Sharding

from .distributed import Dist
from .errors import Refused
from .model import is_meta, materialize

log = logging.getLogger(__name__)


def resolve_strategy(spec: ParallelismSpec, world_size: int) -> Sharding | None:
    """The strategy a run uses; None for a single plain process."""
    if world_size == 1:
        return None
    return Sharding.fsdp if spec.strategy == Sharding.auto else spec.strategy


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks, found through the class names transformers itself keeps
    whole (`_no_split_modules`); a model without them cannot be sharded block by block."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not blocks:
        raise Refused(f"cannot find the decoder blocks of {type(model).__name__} to wrap for "
                      "sharding or activation checkpointing (its _no_split_modules names none); "
                      "use training.parallelism.strategy ddp and activationCheckpointing none")
    return blocks


def _checkpoint_blocks(model: nn.Module, mode: ActivationCheckpointing) -> str:
    """Wrap blocks for recompute; says how many it wrapped (for the log)."""
    if mode == ActivationCheckpointing.none:
        return "no activation checkpointing"
    every = 1 if mode == ActivationCheckpointing.full else 2
    blocks = decoder_blocks(model)
    for block in blocks[::every]:
        parent, name = _parent_of(model, block)
        setattr(parent, name, checkpoint_wrapper(block, preserve_rng_state=False))
    return f"activation checkpointing ({mode.value}) on {len(blocks[::every])} of {len(blocks)} blocks"


def _parent_of(root: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for module in root.modules():
        for name, sub in module.named_children():
            if sub is child:
                return module, name
    raise LookupError("block not found under the model")


def _mesh(strategy: Sharding, dist: Dist, procs_per_node: int) -> DeviceMesh:
    kind = dist.device.type
    if strategy == Sharding.hsdp:
        nodes = dist.world_size // procs_per_node
        return init_device_mesh(kind, (nodes, procs_per_node), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(kind, (dist.world_size,), mesh_dim_names=("shard",))


def mixed_precision(dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction; the identity when training in fp32."""
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard(model: nn.Module, mesh: DeviceMesh, *, compute_dtype: torch.dtype | None = None,
          offload: bool = False) -> nn.Module:
    """fully_shard every decoder block, then the root (embeddings, final norm, head)."""
    # Pinned host memory speeds up host-device copies and needs a CUDA driver; a CPU mesh
    # (gloo) copies nothing, so it pins nothing.
    policy: OffloadPolicy = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") \
        if offload else OffloadPolicy()
    mp = mixed_precision(compute_dtype)
    for block in decoder_blocks(model):
        fully_shard(_outermost(model, block), mesh=mesh, mp_policy=mp, offload_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=policy)
    return model


def _outermost(model: nn.Module, block: nn.Module) -> nn.Module:
    """The checkpoint wrapper around a block when there is one (sharding goes outside it)."""
    parent, name = _parent_of(model, block)
    return parent if type(parent).__name__ == "CheckpointWrapper" else block


@dataclass
class Parallel:
    """The model as the loop trains it, and what differs between strategies."""

    model: nn.Module
    """The bare model: FSDP2 shards it in place, so this is also what state dicts are taken of."""
    strategy: Sharding | None
    mesh: DeviceMesh | None
    ddp: DistributedDataParallel | None = None

    @property
    def sharded(self) -> bool:
        return self.strategy in (Sharding.fsdp, Sharding.hsdp)

    @property
    def forward(self) -> nn.Module:
        return self.ddp if self.ddp is not None else self.model

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Gradients are reduced only on the last micro-batch of a step."""
        if self.ddp is not None and not last:
            with self.ddp.no_sync():
                yield
            return
        if isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(last)
        yield

    def reshard(self) -> None:
        """Free the unsharded parameters a forward-only pass (evaluation, checks) leaves behind:
        FSDP2 keeps the root gathered until a backward that never comes, and until then the
        registered parameters are not the sharded ones the optimizer and checkpoints hold."""
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def clip(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP
        return float(full() if full is not None else norm)


def parallelize(model: nn.Module, spec: ParallelismSpec, dist: Dist, *, procs_per_node: int,
                compute_dtype: torch.dtype | None) -> Parallel:
    """Wrap `model` (on CPU or its device) for the run's strategy and move it to the device."""
    strategy = resolve_strategy(spec, dist.world_size)
    wrapped = _checkpoint_blocks(model, spec.activation_checkpointing)
    meta = is_meta(model)  # a skeleton: allocate only what this rank holds, after sharding
    if strategy in (Sharding.fsdp, Sharding.hsdp):
        mesh = _mesh(strategy, dist, procs_per_node)
        log.info("parallelism: %s over mesh %s, %s, cpu offload %s", strategy.value,
                 tuple(mesh.shape), wrapped, "on" if spec.cpu_offload else "off")
        if not (spec.cpu_offload or meta):
            model.to(dist.device)
        shard(model, mesh, compute_dtype=compute_dtype, offload=spec.cpu_offload)
        if meta:
            materialize(model, "cpu" if spec.cpu_offload else dist.device)
        return Parallel(model, strategy, mesh)
    log.info("parallelism: %s on %d ranks, %s", strategy.value if strategy else "one process",
             dist.world_size, wrapped)
    if meta:
        materialize(model, dist.device)
    else:
        model.to(dist.device)
    # Gradients as views into the reduction buckets: no second fp32 copy of every gradient.
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True) \
        if strategy == Sharding.ddp and dist.enabled else None
    return Parallel(model, strategy, None, ddp)


def shard_frozen(model: nn.Module, parallel: Parallel, dist: Dist,
                 dtype: torch.dtype | None) -> nn.Module:
    """A frozen model (the reference base) laid out like the trained one: sharded under fsdp,
    in bf16 on GPU, never part of the optimizer; a skeleton gets only this rank's slices.
    Sharded, it frees its parameters after every forward, the root's included: FSDP2 keeps a
    root gathered after a forward for the backward that follows, which never comes for a frozen
    model (a whole base on every rank)."""
    model.requires_grad_(False).eval()
    if dtype is not None:
        model.to(dtype)
    meta = is_meta(model)
    if parallel.sharded and parallel.mesh is not None:
        if not meta:
            model.to(dist.device)
        shard(model, parallel.mesh).set_reshard_after_forward(True)  # type: ignore[operator]
    elif not meta:
        model.to(dist.device)
    if meta:
        materialize(model, dist.device)
    return model
