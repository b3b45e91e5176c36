"""How a run trains: optimizer, LR schedule, gradient and anomaly handling, regularization,
budget, the training step's layout over ranks, and checkpointing.

Everything the trainer needs to take and save one optimizer step, apart from the data it reads
(`cpt_api.data`) and the machines it runs on (`cpt_api.resources`). Part of the CptRun spec
(`cpt_api.spec` assembles the sections).
"""
from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import Field, model_validator

from .base import SpecModel
from .storage import URI_PATTERN


class OptimizerSpec(SpecModel):
    lr: float = Field(default=3e-5, gt=0, le=1.0)
    """Peak learning rate; CPT peaks well below the pretraining LR."""
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(default=0.1, ge=0, le=1)
    eps: float = Field(default=1e-8, gt=0)

    @model_validator(mode="after")
    def _betas_in_range(self) -> "OptimizerSpec":
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must each be in [0, 1)")
        return self


class DecayKind(str, Enum):
    cosine = "cosine"
    linear = "linear"
    exponential = "exponential"
    wsd = "wsd"
    constant = "constant"


class ScheduleSpec(SpecModel):
    warmup_steps: int = Field(default=100, ge=0)
    decay: DecayKind = DecayKind.cosine
    min_lr: float = Field(default=0.0, ge=0)
    decay_fraction: float = Field(default=0.2, gt=0, le=1)
    """wsd: the share of steps spent in the final decay phase."""
    rewarm_steps: int = Field(default=10, ge=0)
    """After a rollback or tune to a checkpoint: steps over which the LR rises linearly from
    1/rewarmSteps of the schedule's value back to it (0: resume at full strength)."""


class NonFiniteAction(str, Enum):
    skip = "skip"
    rollback = "rollback"
    stop = "stop"


class AnomalySpec(SpecModel):
    k: float = Field(default=6.0, gt=0)
    """A step is anomalous when its grad norm exceeds mean + k·std of the recent window."""
    window: int = Field(default=50, ge=5)
    """Recent accepted steps the mean and std are taken over."""
    max_consecutive: int = Field(default=3, ge=1)
    """Anomalous steps in a row after which the trainer restores the last stable checkpoint."""
    loss_spike_factor: float = Field(default=3.0, gt=1)
    """A loss above this multiple of the recent mean also counts as anomalous."""
    on_non_finite: NonFiniteAction = NonFiniteAction.skip


class GradientSpec(SpecModel):
    clip: float = Field(default=1.0, gt=0)
    """Max global grad norm: g <- g·min(1, clip/‖g‖)."""
    anomaly: AnomalySpec = Field(default_factory=AnomalySpec)


class RefKLSpec(SpecModel):
    beta: float = Field(default=0.0, ge=0, le=10)
    """Weight of KL(p_base || p_theta) on replay windows; 0 disables the frozen reference."""


class RegularizationSpec(SpecModel):
    ref_kl: RefKLSpec = Field(default_factory=RefKLSpec, alias="refKL")


class BudgetSpec(SpecModel):
    tokens: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_limit(self) -> "BudgetSpec":
        if self.tokens is None and self.steps is None:
            raise ValueError("set budget.tokens or budget.steps (a run needs an end)")
        return self


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Sharding(str, Enum):
    auto = "auto"
    ddp = "ddp"
    fsdp = "fsdp"
    hsdp = "hsdp"


class ActivationCheckpointing(str, Enum):
    none = "none"
    full = "full"
    selective = "selective"


class ParallelismSpec(SpecModel):
    strategy: Sharding = Sharding.auto
    """How model state is spread over the ranks. ddp: every rank holds all parameters, gradients
    and optimizer state (about 16 bytes a parameter in fp32 AdamW). fsdp: FSDP2 shards them over
    all ranks (each decoder block and the root are `fully_shard`ed), so per-rank state shrinks with
    the world size. hsdp: shard within a node, replicate across nodes (a 2-D mesh), which keeps the
    all-gathers on the fast intra-node links. auto: fsdp when the run has more than one rank (a
    7B+ base does not fit replicated), a plain single process otherwise."""
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    """Recompute activations in the backward pass instead of keeping them: full wraps every
    decoder block, selective every other one (about half the activation memory for a third of
    the recompute)."""
    cpu_offload: bool = False
    """fsdp/hsdp only: keep the sharded parameters, gradients and optimizer state in host memory
    (FSDP2 CPUOffloadPolicy; the AdamW step runs on the CPU). Frees most GPU memory for
    activations, at the cost of host-device traffic every step."""
    collective_timeout_seconds: int = Field(default=1800, ge=10, le=86_400)
    """How long a rank waits in one collective (an all-gather, a barrier) before the process
    group fails the attempt instead of hanging: a peer that died or took another code path is
    reported after this long. Long enough for the slowest step, save or evaluation a rank can
    wait on; short values are for tests."""

    @model_validator(mode="after")
    def _offload_needs_sharding(self) -> "ParallelismSpec":
        if self.cpu_offload and self.strategy == Sharding.ddp:
            raise ValueError("cpuOffload needs strategy fsdp or hsdp (ddp keeps full replicas)")
        return self


class TrainingSpec(SpecModel):
    micro_batch_size: int = Field(default=4, ge=1)
    """Sequences per device per forward pass."""
    grad_accumulation: int = Field(default=1, ge=1)
    precision: Precision = Precision.auto
    """auto: bf16 autocast on GPU, fp32 on CPU."""
    seed: int = 0
    log_every: int = Field(default=1, ge=1)
    attention: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = "auto"
    """Attention kernel. Packed documents get a block-diagonal mask from their position ids;
    `sdpa` and `eager` build it as a dense seqLen x seqLen mask, `flex_attention` as a block mask
    and `flash_attention_2` as variable-length sequences (neither dense). auto: flash_attention_2
    on GPU when the flash-attn package is installed, else flex_attention on GPU; sdpa on CPU."""
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)


class CheckpointSpec(SpecModel):
    uri: str | None = Field(default=None, max_length=4096, pattern=URI_PATTERN)
    """Where checkpoints go (fsspec URL); default: the run directory's checkpoints/."""
    every: int = Field(default=100, ge=1)
    """Save every N optimizer steps (and at the end)."""
    keep: int = Field(default=5, ge=1)
    """Newest checkpoints kept; frontier and last-good checkpoints are never pruned."""
    asynchronous: bool = True
    """Write checkpoint shards in the background while training goes on (the step stalls only
    for a copy to host memory); the manifest still commits a checkpoint only when every rank's
    shards are durable. false: every save blocks until committed."""
