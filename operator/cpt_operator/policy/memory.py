"""Per-rank memory of a CptRun's training step, planned from the spec and the base's shape.

This is the plan of the device the step runs on: each GPU's memory, or for CPU runs (all fp32)
each process's share of host memory. The rest of host memory (a process's fixed cost beside a
GPU, the load peak, checkpoint staging, offloaded state, the data worker, the pod as a whole)
is planned in `memory_host.py`, which counts a CPU run's step as one of its parts. Counted here:

- parameters, gradients, optimizer: fp32 master weights (4 B/param), fp32 gradients (4 B) and
  AdamW's two moments (8 B), divided by the shard count: 1 for ddp and a single process, the
  world size for fsdp, the processes per node for hsdp (sharded within a node, replicated
  across nodes). With `cpuOffload` these live in host memory (`memory_host.py` counts them) and
  the device holds none of them.
  ddp assumes the trainer lets DDP's buckets alias the gradients (`gradient_as_bucket_view`);
  otherwise DDP keeps a second fp32 copy of the gradients (+4 B/param).
  - ddp / single process on GPU in bf16: autocast casts each weight to bf16 once per forward and
    keeps the copy for the backward pass: +2 B/param.
  - fsdp / hsdp: the unsharded working copies FSDP2 gathers (bf16 under MixedPrecisionPolicy,
    else fp32): two decoder blocks (the current one and the prefetched next) plus the root group
    (embedding, final norm, head), which FSDP2 leaves gathered between forward and backward;
    their unsharded gradients likewise, plus the fp32 copy of the largest group that
    `reduce_dtype=fp32` makes for the reduce-scatter.
- activations and logits: see `activations.py`, for `packing.seqLen × training.microBatchSize`
  tokens.
- reference: the frozen base (when `spec.needs_reference`), bf16 on GPU and fp32 on CPU, sharded
  like the model under fsdp/hsdp, whole under ddp. It is not offloaded. Its transient gathers
  are freed before the backward pass, where the peak is, and are not counted.
- buffers: CUDA context and kernels (~0.5-1 GiB on recent GPUs), NCCL communicators and
  buffers (a few hundred MiB), cuBLAS workspaces: a fixed 1.5 GiB per GPU, plus 5 % of the rest
  for the caching allocator's fragmentation. A CPU process: 0.75 GiB (the interpreter, torch,
  transformers and the tokenizer: 784 MiB measured after the trainer's imports) plus the same 5 %.

Not counted: evaluation (it runs between steps, without gradients, on batches whose logits are
bounded to 256 MiB), the data pipeline's buffers, and on CPU runs the parts `memory_host.py`
adds (checkpoint staging, the data worker, the load peak).
"""
from __future__ import annotations

from dataclasses import dataclass

from cpt_api.quantity import format_bytes, parse_quantity
from cpt_api.spec import CptRunSpec, Precision, Sharding
from .activations import Dtypes, activation_bytes, logit_bytes
from .model_shape import ModelShape

GIB = 1 << 30
FIXED_GPU_BYTES = 3 * GIB // 2
FIXED_CPU_BYTES = 3 * GIB // 4
FRAGMENTATION = 0.05
SHARDED = ("fsdp", "hsdp")


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the ranks run: `nodes` × `procs_per_node` processes, on GPUs or CPUs."""

    nodes: int
    procs_per_node: int
    gpu: bool

    @property
    def world(self) -> int:
        return self.nodes * self.procs_per_node

    @classmethod
    def of(cls, spec: CptRunSpec) -> Layout:
        r = spec.resources
        return cls(nodes=r.nodes, procs_per_node=r.procs_per_node, gpu=r.gpus_per_node > 0)


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Bytes per rank, by part, for one training step's peak."""

    strategy: str
    """What runs: single, ddp, fsdp or hsdp (auto resolved)."""
    layout: Layout
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    reference: int
    buffers: int

    def parts(self) -> dict[str, int]:
        return {"parameters": self.parameters, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "logits": self.logits, "reference": self.reference,
                "buffers": self.buffers}

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    def fits(self, memory: int) -> bool:
        return self.total <= memory

    def largest(self, n: int = 2) -> list[str]:
        """The parts that dominate, as `name size`, largest first."""
        top = sorted(self.parts().items(), key=lambda kv: -kv[1])[:n]
        return [f"{name} {format_bytes(size)}" for name, size in top]


def resolve_strategy(spec: CptRunSpec, layout: Layout) -> str:
    """`auto` is fsdp with more than one rank and a plain single process otherwise."""
    chosen = spec.training.parallelism.strategy
    if chosen == Sharding.auto:
        return "fsdp" if layout.world > 1 else "single"
    return str(chosen.value)


def dtypes(spec: CptRunSpec, strategy: str, gpu: bool) -> Dtypes:
    if not gpu or spec.training.precision == Precision.fp32:
        return Dtypes(compute=4, residual=4)
    # FSDP's mixed precision computes on bf16 weights; autocast keeps the residual stream fp32
    return Dtypes(compute=2, residual=2 if strategy in SHARDED else 4)


def shards(strategy: str, layout: Layout) -> int:
    return {"fsdp": layout.world, "hsdp": layout.procs_per_node}.get(strategy, 1)


def estimate(spec: CptRunSpec, shape: ModelShape, layout: Layout | None = None) -> MemoryPlan:
    """Per-rank bytes of `spec`'s training step on `layout` (default: the spec's resources)."""
    layout = layout or Layout.of(spec)
    strategy = resolve_strategy(spec, layout)
    dt = dtypes(spec, strategy, layout.gpu)
    params, grads, optim = _model_state(spec, shape, strategy, layout, dt)
    tokens = spec.packing.seq_len * spec.training.micro_batch_size
    acts = activation_bytes(shape, tokens, dt, spec.training.parallelism.activation_checkpointing)
    logits = logit_bytes(shape, tokens, dt, kl=spec.regularization.ref_kl.beta > 0)
    ref = reference_bytes(spec, shape, strategy, layout)
    subtotal = params + grads + optim + acts + logits + ref
    return MemoryPlan(strategy=strategy, layout=layout, parameters=params, gradients=grads,
                      optimizer=optim, activations=acts, logits=logits, reference=ref,
                      buffers=_buffers(subtotal, layout.gpu))


def _model_state(spec: CptRunSpec, shape: ModelShape, strategy: str, layout: Layout,
                 dt: Dtypes) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer) bytes on one rank."""
    n, p = shards(strategy, layout), shape.params
    params, grads, optim = (0, 0, 0) if offloaded(spec, strategy) else (4 * p // n, 4 * p // n, 8 * p // n)
    if strategy not in SHARDED:
        autocast_copy = 2 * p if dt.compute == 2 else 0
        return params + autocast_copy, grads, optim
    gathered = 2 * shape.block_params + shape.root_params
    reduce_copy = 4 * max(shape.block_params, shape.root_params) if dt.compute == 2 else 0
    return params + dt.compute * gathered, grads + dt.compute * gathered + reduce_copy, optim


def offloaded(spec: CptRunSpec, strategy: str) -> bool:
    """Whether FSDP2 keeps the sharded state in host memory (`cpuOffload` means nothing to ddp)."""
    return spec.training.parallelism.cpu_offload and strategy in SHARDED


def reference_bytes(spec: CptRunSpec, shape: ModelShape, strategy: str, layout: Layout) -> int:
    if not spec.needs_reference:
        return 0
    per_param = 2 if layout.gpu and spec.training.precision != Precision.fp32 else 4
    return per_param * shape.params // shards(strategy, layout)


def _buffers(subtotal: int, gpu: bool) -> int:
    return (FIXED_GPU_BYTES if gpu else FIXED_CPU_BYTES) + int(FRAGMENTATION * subtotal)


def memory_limit(spec: CptRunSpec) -> int | None:
    """`resources.gpuMemory` in bytes, or None when the spec does not say."""
    return parse_quantity(spec.resources.gpu_memory) if spec.resources.gpu_memory else None
