"""The CptRun spec: the one source of truth for the CRD, the local runner and the trainer.

Cross-field rules live here as validators; the CRD carries the same rules as CEL
(see `cel_rules.py`), so a cluster rejects what `cptctl validate` rejects.
"""
from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import Field, model_validator

from .base import SpecModel
from .quantity import QUANTITY_PATTERN
from .storage import URI_PATTERN
from .evaluation import EvaluationSpec, GateSpec, SelectionSpec, StopPolicySpec, SuiteKind, SuiteSpec


class ModelFormat(str, Enum):
    hf = "hf"
    gguf = "gguf"
    checkpoint = "checkpoint"


class RestoreMode(str, Enum):
    weights_only = "weightsOnly"
    full_state = "fullState"


class BaseModelSpec(SpecModel):
    uri: str = Field(min_length=1, max_length=4096, pattern=URI_PATTERN)
    """Where the base model lives: an HF model directory, a .gguf file, or a cpt checkpoint
    directory (any fsspec URL). It is only ever read."""
    format: ModelFormat = ModelFormat.hf
    """`hf` (config.json + safetensors), `gguf` (dequantised on load) or `checkpoint` (a
    checkpoint written by this system, needed for fullState restore)."""
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """Expected digest of the base's weights; a mismatch refuses to start (wrong base)."""
    restore_mode: RestoreMode = RestoreMode.weights_only
    """weightsOnly: a new experiment (fresh optimizer, new warm-up). fullState: continue the
    trajectory of a checkpoint (optimizer, schedule, RNG, data position)."""
    import_checkpoint: bool = False
    """The base is a checkpoint another run wrote (its root's run.json names that run): start
    from it. Without this such a base is refused, so naming a URI is not enough to read another
    run's weights."""

    @model_validator(mode="after")
    def _full_state_needs_checkpoint(self) -> "BaseModelSpec":
        if self.restore_mode == RestoreMode.full_state and self.format != ModelFormat.checkpoint:
            raise ValueError(
                "restoreMode fullState needs format 'checkpoint' (optimizer and data state exist "
                "only in checkpoints written by this system); use weightsOnly for hf/gguf bases"
            )
        if self.import_checkpoint and self.format != ModelFormat.checkpoint:
            raise ValueError("importCheckpoint needs format 'checkpoint'")
        return self


class TokenizerExtensionSpec(SpecModel):
    terms: list[str] = Field(default_factory=list, max_length=100_000)
    """Domain terms to add as single tokens."""
    top_k: int | None = Field(default=None, ge=1, le=100_000)
    """Add the K terms whose extension saves most context, found by analysing the domain data."""
    oversample_steps: int = Field(default=0, ge=0)
    """For this many steps, windows containing new tokens are sampled more often."""
    oversample_factor: float = Field(default=2.0, ge=1.0, le=16.0)
    """How much more often such windows are kept during the oversampling warm-up."""


class TokenizerSpec(SpecModel):
    uri: str | None = Field(default=None, max_length=4096, pattern=URI_PATTERN)
    """Tokenizer location; empty means the base model's own tokenizer."""
    version: str | None = None
    """Expected tokenizer hash (sha256 of its serialised vocabulary); a mismatch is refused."""
    extend: TokenizerExtensionSpec | None = None


class SourceRole(str, Enum):
    domain = "domain"
    replay = "replay"
    instruction = "instruction"


class SourceFormat(str, Enum):
    text = "text"
    jsonl = "jsonl"
    parquet = "parquet"


class WeightPoint(SpecModel):
    tokens: int = Field(ge=0)
    """Position in the run, in training tokens."""
    weight: float = Field(ge=0)


GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
"""Gopher's English stop words (Rae et al. 2021): a document with fewer than two is rarely prose."""


class QualitySpec(SpecModel):
    """Heuristic quality rules run on each document as it is read: Gopher's quality rules (Rae
    et al. 2021) and, when `fineweb` is set, FineWeb's line rules (Penedo et al. 2024), both as
    datatrove implements them. The defaults are datatrove's, set for English web text: another
    language needs its own `stopWords`, and code fails the word rules (leave it unfiltered or
    turn rules off). A null threshold turns its rule off."""

    min_words: int | None = Field(default=50, ge=1)
    max_words: int | None = Field(default=100_000, ge=1)
    min_mean_word_length: float | None = Field(default=3, ge=0)
    max_mean_word_length: float | None = Field(default=10, ge=0)
    max_symbol_word_ratio: float | None = Field(default=0.1, ge=0)
    """Largest count of '#' (or of ellipses) per word."""
    max_bullet_lines_ratio: float | None = Field(default=0.9, ge=0, le=1)
    max_ellipsis_lines_ratio: float | None = Field(default=0.3, ge=0, le=1)
    min_alpha_words_ratio: float | None = Field(default=0.8, ge=0, le=1)
    """Smallest share of words with at least one letter: random symbols fail it."""
    min_stop_words: int | None = Field(default=2, ge=1)
    """Fewest distinct stop words a document must contain."""
    stop_words: list[str] = Field(default_factory=lambda: list(GOPHER_STOP_WORDS), max_length=1000)
    fineweb: bool = False
    """Also FineWeb's rules: share of lines ending in punctuation, of short lines, of duplicated
    line characters, newlines per word (web pages; they drop most structured text)."""


class DataSource(SpecModel):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$", max_length=63)
    role: SourceRole
    uri: str = Field(min_length=1, max_length=4096, pattern=URI_PATTERN)
    """fsspec URL or glob (local path, s3://bucket/prefix/*.jsonl, ...)."""
    format: SourceFormat = SourceFormat.text
    field: str = "text"
    """JSONL field or Parquet column holding the document text."""
    weight: float = Field(default=1.0, gt=0)
    """Relative sampling weight (normalised over all sources)."""
    schedule: list[WeightPoint] | None = Field(default=None, max_length=64)
    """Curriculum: weight as a piecewise-linear function of training tokens."""
    quality: QualitySpec | None = None
    """This source's quality rules, in place of `curation.quality`."""

    @model_validator(mode="after")
    def _schedule_sorted(self) -> "DataSource":
        if self.schedule is not None:
            if len(self.schedule) < 2:
                raise ValueError("schedule needs at least two points")
            positions = [p.tokens for p in self.schedule]
            if positions != sorted(positions) or len(set(positions)) != len(positions):
                raise ValueError("schedule points must have strictly increasing tokens")
        return self


class MixtureStrategy(str, Enum):
    fixed = "fixed"
    curriculum = "curriculum"
    adaptive = "adaptive"


class CurationSpec(SpecModel):
    dedupe: Literal["none", "exact", "near"] = "exact"
    """Drop duplicate documents: exact (hash) or near (MinHash over word shingles)."""
    near_threshold: float = Field(default=0.85, gt=0, le=1)
    min_chars: int = Field(default=32, ge=0)
    max_chars: int = Field(default=2_000_000, ge=1)
    max_non_printable: float = Field(default=0.1, ge=0, le=1)
    """Largest share of non-printable characters a document may have."""
    max_repeated_line_ratio: float = Field(default=0.5, ge=0, le=1)
    """Largest share of duplicated lines (templated boilerplate) a document may have."""
    quality: QualitySpec | None = None
    """Quality rules for every source without its own (`sources[].quality`); none when unset."""
    max_dropped_share: float = Field(default=0.9, gt=0, le=1)
    """A source of which curation drops more than this share of the documents read (once 32 or
    more are read) refuses the run, naming the source and the filters: its data is broken, or a
    filter does not suit it."""
    decontaminate: bool = True
    """Drop training documents that share an n-gram with an evaluation set."""
    decontamination_ngram: int = Field(default=13, ge=4, le=64)


class DataSpec(SpecModel):
    sources: list[DataSource] = Field(min_length=1, max_length=64)
    strategy: MixtureStrategy = MixtureStrategy.fixed
    seed: int = 0
    adaptive_max_boost: float = Field(default=2.0, ge=1.0, le=10.0)
    """adaptive: a source's weight may grow to at most this multiple of its base weight."""
    curation: CurationSpec = Field(default_factory=CurationSpec)

    @model_validator(mode="after")
    def _consistent(self) -> "DataSpec":
        names = [s.name for s in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique; repeated: {', '.join(duplicates)}")
        if not any(s.role == SourceRole.domain for s in self.sources):
            raise ValueError("the mixture needs at least one source with role 'domain'")
        has_schedule = any(s.schedule for s in self.sources)
        if has_schedule and self.strategy != MixtureStrategy.curriculum:
            raise ValueError("a source has a schedule but strategy is not 'curriculum'")
        return self


class Boundary(str, Enum):
    eos = "eos"
    document_mask = "documentMask"


class PackingSpec(SpecModel):
    seq_len: int = Field(default=1024, ge=16, le=1_048_576)
    boundary: Boundary = Boundary.document_mask
    """eos: EOS between documents, attention may cross them. documentMask: position ids restart
    per document and attention is block-diagonal, so no document sees another."""


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


class CptRunSpec(SpecModel):
    base_model: BaseModelSpec
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    data: DataSpec
    packing: PackingSpec = Field(default_factory=PackingSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    gradient: GradientSpec = Field(default_factory=GradientSpec)
    regularization: RegularizationSpec = Field(default_factory=RegularizationSpec)
    budget: BudgetSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    evaluation: EvaluationSpec | None = None
    gates: list[GateSpec] = Field(default_factory=list, max_length=64)
    stop_policy: StopPolicySpec = Field(default_factory=StopPolicySpec)
    selection: SelectionSpec = Field(default_factory=SelectionSpec)

    def suites_by_name(self) -> dict[str, SuiteSpec]:
        return {s.name: s for s in (self.evaluation.suites if self.evaluation else [])}

    def tokens_per_step(self, world_size: int) -> int:
        """Tokens one optimizer step consumes over `world_size` ranks."""
        t = self.training
        return t.micro_batch_size * t.grad_accumulation * self.packing.seq_len * world_size

    def total_steps(self, world_size: int) -> int:
        """Optimizer steps in the budget; with both limits set the earlier one ends the run."""
        limits = []
        if self.budget.steps is not None:
            limits.append(self.budget.steps)
        if self.budget.tokens is not None:
            limits.append(-(-self.budget.tokens // self.tokens_per_step(world_size)))
        return max(1, min(limits))

    @property
    def needs_reference(self) -> bool:
        """Whether the trainer loads the frozen base beside the model: for the KL-to-base term
        or for a drift suite. The trainer and the memory planner both ask this."""
        drift = self.evaluation is not None and self.evaluation.needs_reference
        return self.regularization.ref_kl.beta > 0 or drift

    @model_validator(mode="after")
    def _cross_field(self) -> "CptRunSpec":
        steps = self.budget.steps
        if steps is not None and self.schedule.warmup_steps >= steps:
            raise ValueError(
                f"schedule.warmupSteps ({self.schedule.warmup_steps}) must be below "
                f"budget.steps ({steps})"
            )
        if self.schedule.min_lr > self.optimizer.lr:
            raise ValueError("schedule.minLr must not exceed optimizer.lr")
        suites = {s.name for s in (self.evaluation.suites if self.evaluation else [])}
        for gate in self.gates:
            if gate.suite not in suites:
                raise ValueError(
                    f"gate {gate.name!r} reads suite {gate.suite!r}, which evaluation.suites "
                    f"does not define (defined: {', '.join(sorted(suites)) or 'none'})"
                )
        plateau = self.stop_policy.plateau
        if plateau is not None and plateau.suite not in suites:
            raise ValueError(
                f"stopPolicy.plateau.suite {plateau.suite!r} is not a suite of evaluation.suites "
                f"(defined: {', '.join(sorted(suites)) or 'none'})"
            )
        domain = [s for s in (self.evaluation.suites if self.evaluation else []) if s.kind == SuiteKind.domain]
        if self.stop_policy.no_improvement is not None and not domain:
            raise ValueError("stopPolicy.noImprovement needs an evaluation suite of kind domain")
        if self.regularization.ref_kl.beta > 0 and not any(
            s.role == SourceRole.replay for s in self.data.sources
        ):
            raise ValueError("regularization.refKL.beta > 0 needs a replay source")
        if self.training.parallelism.strategy == Sharding.hsdp and self.resources.nodes < 2:
            raise ValueError("training.parallelism.strategy hsdp replicates across nodes: it needs "
                             "resources.nodes >= 2 (use fsdp on one node)")
        return self


class ObjectMeta(SpecModel):
    model_config = SpecModel.model_config | {"extra": "allow"}
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


GROUP = "cpt.mlops.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CptRun"
PLURAL = "cptruns"


class CptRun(SpecModel):
    api_version: Literal["cpt.mlops.dev/v1alpha1"] = API_VERSION  # type: ignore[assignment]
    kind: Literal["CptRun"] = KIND  # type: ignore[assignment]
    metadata: ObjectMeta
    spec: CptRunSpec
    model_config = SpecModel.model_config | {"extra": "ignore"}  # status etc. live elsewhere
