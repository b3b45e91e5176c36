"""Host memory of one pod, planned beside the step's plan (`memory.py`) and checked against
`resources.memory`.

`resources.memory` is the request and the limit of a pod's trainer container: one node's
torchrun launcher and its `procsPerNode` ranks (one per GPU, or `nprocPerNode` on CPU). Not every
part exists at once, so each rank is planned at two moments and its peak is the larger:

loading, while the trainer sets up: no optimizer state yet (AdamW makes it at the first step),
nothing staged, no data worker (forked at the first batch).
- process: the interpreter, torch, transformers and the tokenizer (0.75 GiB, 784 MiB measured
  after the trainer's imports; 1.04 GiB at the end of a setup with next to no weights, with the
  process group and the data pipeline started: bench/bench_load.py); with a GPU also the CUDA
  runtime's host side (the context, cuBLAS and NCCL's host buffers, the pinned pool of
  host-to-device copies): 1.25 GiB, an estimate, not measured.
- weights: what the loads leave on the host. A CPU run's fp32 shard of the parameters
  (4 B/param over the shard count) and of the reference; with `cpuOffload` the fp32 shard of the
  parameters FSDP2 keeps on the host; on a GPU otherwise none: each slice goes to the GPU as it
  is read.
- load: each rank reads only its own slices (HF safetensors by byte range, this system's
  checkpoints through DCP) through one read buffer of 64 MiB, or of this rank's slice of the
  largest tensor in fp32 when that is larger. GGUF bases are the exception, and their documented
  limit (small models): transformers dequantises the whole model on every rank before it is
  sharded, holding the dequantised tensors and the model built from them (1.7x the fp32 model
  measured for a 60 M Q8_0 Llama, 2.0x for F16): 8 B/param of the whole model. The reference,
  when the run has one, is loaded the same way after the model: counted as if both loads' weights
  were resident during one load's transient.
- gathered (sharded CPU runs): the setup ends with a forward (the document-isolation check), in
  which FSDP2 all-gathers the root group and prefetches the next block while one computes: fp32
  copies of the root and two blocks. Measured on a 0.84 B Llama on 4 CPU ranks: a load peak of
  2.45 GiB a rank, 0.63 GiB of it this forward (bench/bench_load.py).

training, from the first checkpoint on:
- process, as above.
- step (CPU runs): the step's plan less the process's own cost, which it counts in its buffers:
  on a CPU every part of the step is host memory.
- offloaded (`cpuOffload`, fsdp/hsdp): fp32 parameters, gradients and AdamW's two moments,
  16 B/param over the shard count (pinned on a GPU node).
- staging (`checkpoint.asynchronous`): the host copy of the parameters and AdamW state an
  asynchronous save writes while training goes on, 12 B/param over the shard count (pinned on a
  GPU node); the stager keeps it for the next save.
- data worker: the DataLoader worker each rank forks. The fork shares the trainer's pages until
  either writes one, but the worker's garbage collector writes the header of every object it
  inherited: over a run it comes to hold its own copy of the interpreter's heap, planned as a
  whole interpreter (0.75 GiB; about 80 MiB of its own were measured two steps after the fork,
  bench/bench_host_memory.py). On CPU runs it also holds the pages of the parameters
  and AdamW moments it forked with, which the optimizer rewrites in place, each write copying a
  page for the trainer (12 B/param over the shard count: a resumed attempt forks after its
  restore; a fresh one forks before AdamW has state and keeps 4 B). On a GPU node the state is on
  the GPU, or offloaded to pinned pages, which the NVIDIA driver maps shared: a fork copies none
  of them.

A pod holds its ranks at the same moment, and torchrun's launcher: 0.5 GiB (its process was
measured at 730 MiB resident, of which about 300 MiB its own; the rest are library pages the
ranks map too).

Not counted: the page cache (files read, checkpoints written before an upload: charged to the
pod but reclaimable), the windows in flight from the data worker through shared memory (a few
MiB), evaluation between steps on a GPU (it runs there) and `cptctl run`'s own process.
"""
from __future__ import annotations

from dataclasses import dataclass

from cpt_api.quantity import format_bytes, parse_quantity
from cpt_api.spec import CptRunSpec, ModelFormat
from .memory import FIXED_CPU_BYTES, GIB, Layout, MemoryPlan, estimate, offloaded, shards
from .model_shape import ModelShape

MIB = 1 << 20
CUDA_HOST_BYTES = 5 * GIB // 4
LAUNCHER_BYTES = GIB // 2
READ_BUFFER_BYTES = 64 * MIB
GGUF_BYTES_PER_PARAM = 8
STAGED_BYTES_PER_PARAM = 4 + 8
"""fp32 parameters and AdamW's two moments."""
STATE_BYTES_PER_PARAM = 4 + 4 + 8
"""fp32 parameters, gradients and AdamW's two moments."""


@dataclass(frozen=True, slots=True)
class HostPlan:
    """Host bytes of one rank by part, at each moment; the pod's total against its memory."""

    strategy: str
    layout: Layout
    loading: dict[str, int]
    training: dict[str, int]
    launcher: int

    @property
    def peak_moment(self) -> str:
        return "loading" if sum(self.loading.values()) > sum(self.training.values()) else "training"

    def parts(self) -> dict[str, int]:
        """The rank's parts at its peak."""
        return self.loading if self.peak_moment == "loading" else self.training

    @property
    def rank(self) -> int:
        return sum(self.parts().values())

    @property
    def total(self) -> int:
        """The pod: every rank at its peak, and the launcher."""
        return self.layout.procs_per_node * self.rank + self.launcher

    def fits(self, memory: int) -> bool:
        return self.total <= memory

    def largest(self, n: int = 2) -> list[str]:
        top = sorted(self.parts().items(), key=lambda kv: -kv[1])[:n]
        return [f"{name} {format_bytes(size)}" for name, size in top]


def host_estimate(spec: CptRunSpec, shape: ModelShape, layout: Layout | None = None) -> HostPlan:
    """Host bytes of `spec`'s pods on `layout` (default: the spec's resources)."""
    step = estimate(spec, shape, layout)
    lay, n, p = step.layout, shards(step.strategy, step.layout), shape.params
    process = FIXED_CPU_BYTES + (CUDA_HOST_BYTES if lay.gpu else 0)
    offload = offloaded(spec, step.strategy)
    loading = {"process": process, "weights": _loaded_weights(step, shape, offload),
               "load": _load_transient(spec, shape, n), "gathered": _first_forward(step, shape)}
    training = {"process": process, "step": 0 if lay.gpu else step.total - FIXED_CPU_BYTES,
                "offloaded": STATE_BYTES_PER_PARAM * p // n if offload else 0,
                "staging": STAGED_BYTES_PER_PARAM * p // n if spec.checkpoint.asynchronous else 0,
                "data_worker": FIXED_CPU_BYTES + (0 if lay.gpu else STAGED_BYTES_PER_PARAM * p // n)}
    return HostPlan(strategy=step.strategy, layout=lay, loading=loading, training=training,
                    launcher=LAUNCHER_BYTES)


def _loaded_weights(step: MemoryPlan, shape: ModelShape, offload: bool) -> int:
    """The fp32 parameter shard where the state lives on the host (a CPU run, `cpuOffload`); a
    CPU run's reference too (on a GPU node the reference goes to the GPU slice by slice)."""
    cpu = not step.layout.gpu
    params = 4 * shape.params // shards(step.strategy, step.layout) if cpu or offload else 0
    return params + (step.reference if cpu else 0)


def _first_forward(step: MemoryPlan, shape: ModelShape) -> int:
    """A sharded CPU run's first forward, at the end of its setup (the document-isolation
    check): FSDP2 all-gathers the root group (embeddings, head) and prefetches the next block
    while one computes, in fp32 on the host. On a GPU the gathered copies are on the GPU."""
    if step.layout.gpu or step.strategy not in ("fsdp", "hsdp"):
        return 0
    return 4 * (shape.root_params + 2 * shape.block_params)


def _load_transient(spec: CptRunSpec, shape: ModelShape, n: int) -> int:
    if spec.base_model.format == ModelFormat.gguf:
        return GGUF_BYTES_PER_PARAM * shape.params
    return max(READ_BUFFER_BYTES, 4 * shape.largest_tensor // n)


def host_memory_limit(spec: CptRunSpec) -> int | None:
    """`resources.memory` (one pod's) in bytes, or None when the spec does not say."""
    return parse_quantity(spec.resources.memory) if spec.resources.memory else None
