"""Where a run's attempts run: nodes, GPUs, memory, scheduling and Kueue admission, and the
time an attempt may take to start or to stop.

Kept apart from the training recipe because these fields change with the cluster, not the
experiment (`cptctl plan --nodes/--gpus-per-node` resizes exactly these). Part of the CptRun spec
(`cpt_api.spec` assembles the sections).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import SpecModel
from .quantity import QUANTITY_PATTERN


class Toleration(SpecModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


MAX_NODES = 1024


class ResourcesSpec(SpecModel):
    nodes: int = Field(default=1, ge=1, le=MAX_NODES)
    gpus_per_node: int = Field(default=0, ge=0, le=16)
    """0 runs on CPU (gloo); >0 one process per GPU (NCCL)."""
    nproc_per_node: int | None = Field(default=None, ge=1, le=256)
    """Processes per node when gpusPerNode is 0 (CPU runs); default 1."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """The node pool, e.g. {pool: h100}."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    image: str | None = None
    """Trainer image; default: the chart's trainer image."""
    cpu: str | None = None
    memory: str | None = Field(default=None, pattern=QUANTITY_PATTERN)
    """Host memory of one pod (a quantity such as `512Gi`): the request and the limit of its
    trainer container, which runs torchrun and one node's ranks. When set, the pod's host memory
    is planned before each attempt starts, as `gpuMemory` is (`cptctl plan`, the operator,
    `cptctl run`), and the run refused (SpecValid=False, reason WontFit, naming host memory and the
    smallest change that fits) if it cannot hold, per rank at its peak: the process itself (with
    the CUDA runtime's host side on a GPU), the load of its slices of the base (GGUF bases are
    dequantised whole on every rank: small models only), the staging copy of asynchronous
    checkpoints (12 B/param over the shard count), `cpuOffload`'s state (16 B/param over the
    shard count) and the data worker; on CPU runs also the whole training step. Not counted: the
    page cache, which the kernel reclaims within the limit."""
    shared_memory: str = "8Gi"
    scratch: str | None = Field(default=None, pattern=QUANTITY_PATTERN)
    """Local disk of one pod (a quantity such as `200Gi`): the size of its work volume (an
    emptyDir holding the trainer's temporary files) and the trainer container's ephemeral-storage
    request and limit, so the scheduler places the pod where that much is free. A save to object
    storage stages each rank's checkpoint files there before uploading them (12 B/param over the
    shard count a rank, removed once uploaded). When set, it is planned before each attempt
    starts, as `memory` is, and the run refused (WontFit, naming the staging need and the
    smallest change that fits) if it cannot hold one save of every rank of the pod and 1 GiB of
    work files. Unset: no request, and the node's free disk decides."""
    gpu_memory: str | None = Field(default=None, pattern=QUANTITY_PATTERN)
    """Memory of one GPU of the pool (a quantity such as `80Gi`). When set, the run is planned
    before each attempt starts (`cptctl plan`, the same check in the operator and `cptctl run`)
    from the base's config.json or GGUF header, and refused (SpecValid=False, reason WontFit,
    naming the smallest change that fits) if a rank's parameters, gradients, optimizer state,
    activations, logits and reference model cannot fit. A base whose shape cannot be read is not
    refused (condition MemoryPlanned=False, reason PlanUnavailable)."""
    s3_secret_ref: str | None = None
    """Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and optional AWS_ENDPOINT_URL)."""
    queue: str | None = Field(default=None, max_length=63)
    """Kueue LocalQueue for gang admission: each attempt's Job is created suspended with the
    queue-name label, and Kueue starts all of its pods or none (condition Admitted). An eviction
    (preemption, pods not ready in time) is not a failure: the run resumes from its last
    checkpoint once admitted again. Without Kueue installed the run is not started (SpecValid
    False, reason KueueNotInstalled)."""
    priority_class: str | None = Field(default=None, max_length=253)
    """Kueue WorkloadPriorityClass of the attempts (with `queue`): a run of a higher class may
    preempt this one within its ClusterQueue."""
    stop_grace_seconds: int = Field(default=600, ge=60, le=86_400)
    """After SIGTERM (a stop, an eviction, a preemption) the trainer finishes its step, waits for
    a checkpoint in flight, writes one at that step and exits; this is how long that may take:
    the pods' terminationGracePeriodSeconds, and torchrun waits this long less a margin before
    it kills its workers. Size it to the storage: a fullState save writes ~16 bytes a
    parameter over all ranks (8B: ~130 GB, 70B: ~1.1 TB)."""
    start_timeout_seconds: int = Field(default=900, ge=30, le=86_400)
    """How long an attempt may take to start: from its Job's start (with `queue`, from Kueue's
    admission: a queued attempt is not starting yet) until every pod's trainer container runs.
    Meanwhile condition Started names what holds a pod back (reason ImagePullFailed,
    ContainerConfigError, ContainerCreateFailed, ContainerRunFailed or Unschedulable; the
    message names the pod and quotes the kubelet or the scheduler). When it passes, the attempt's
    Job is deleted (its GPUs are freed) and the run ends Failed, reason StartTimeout, naming the
    cause; no restart is spent, since a restart would fail the same way. With `queue`, the time
    that earlier attempts spent starting before Kueue evicted them (waitForPodsReady) counts too
    (`status.startingSeconds`), until an attempt's trainers run. Leave room for pulling the
    trainer image onto a fresh node."""

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node or self.nproc_per_node or 1
