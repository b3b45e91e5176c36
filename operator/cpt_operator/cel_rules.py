"""Cross-field rules as CEL, attached to the CRD so `kubectl apply` rejects what the models do.

Each rule mirrors a model validator of the spec's models (`cpt_api.spec` and the section modules
it assembles, `cpt_api.evaluation` among them; tests feed the same bad specs to both). The CRD
stores no defaults, so a rule that reads an optional field substitutes the model's default for it.
"""
from __future__ import annotations

from dataclasses import dataclass

from cpt_api.evaluation import CodeSpec, GateSpec
from cpt_api.spec import ScheduleSpec


@dataclass(frozen=True)
class CelRule:
    path: tuple[str, ...]
    """Schema location under `spec`; "[]" steps into array items."""
    rule: str
    message: str
    reason: str | None = None


_WARMUP = ScheduleSpec.model_fields["warmup_steps"].default
_RELATIVE = GateSpec.model_fields["relative"].default
_CODE_K = CodeSpec.model_fields["k"].default
_CODE_SAMPLES = CodeSpec.model_fields["samples"].default

RULES: tuple[CelRule, ...] = (
    CelRule(("spec",), "!has(self.budget.steps) || "
            f"(has(self.schedule) && has(self.schedule.warmupSteps) ? self.schedule.warmupSteps : {_WARMUP})"
            " < self.budget.steps",
            "schedule.warmupSteps must be below budget.steps"),
    CelRule(("spec",), "!has(self.schedule) || !has(self.schedule.minLr) || "
            "self.schedule.minLr <= (has(self.optimizer) && has(self.optimizer.lr) ? self.optimizer.lr : 3e-5)",
            "schedule.minLr must not exceed optimizer.lr"),
    CelRule(("spec",), "!has(self.gates) || self.gates.all(g, has(self.evaluation) && "
            "self.evaluation.suites.exists(s, s.name == g.suite))",
            "every gate must read a suite defined in evaluation.suites"),
    CelRule(("spec",), "!has(self.stopPolicy) || !has(self.stopPolicy.plateau) || (has(self.evaluation) && "
            "self.evaluation.suites.exists(s, s.name == self.stopPolicy.plateau.suite))",
            "stopPolicy.plateau.suite must name a suite defined in evaluation.suites"),
    CelRule(("spec",), "!has(self.stopPolicy) || !has(self.stopPolicy.noImprovement) || (has(self.evaluation) && "
            "self.evaluation.suites.exists(s, s.kind == 'domain'))",
            "stopPolicy.noImprovement needs an evaluation suite of kind domain"),
    CelRule(("spec",), "!has(self.regularization) || !has(self.regularization.refKL) || "
            "!has(self.regularization.refKL.beta) || self.regularization.refKL.beta == 0.0 || "
            "self.data.sources.exists(s, s.role == 'replay')",
            "regularization.refKL.beta > 0 needs a replay source"),
    CelRule(("spec", "baseModel"), "self == oldSelf",
            "baseModel is immutable: the base of a run cannot change (create a new CptRun)"),
    CelRule(("spec",), "!has(oldSelf.checkpoint) || !has(oldSelf.checkpoint.uri) || "
            "(has(self.checkpoint) && has(self.checkpoint.uri) && self.checkpoint.uri == oldSelf.checkpoint.uri)",
            "checkpoint.uri is immutable: the run's checkpoints live there (create a new CptRun to use "
            "another place)"),
    CelRule(("spec", "baseModel"), "!has(self.restoreMode) || self.restoreMode != 'fullState' || "
            "(has(self.format) && self.format == 'checkpoint')",
            "restoreMode fullState needs format 'checkpoint'"),
    CelRule(("spec", "baseModel"), "!has(self.importCheckpoint) || !self.importCheckpoint || "
            "(has(self.format) && self.format == 'checkpoint')",
            "importCheckpoint needs format 'checkpoint'"),
    CelRule(("spec", "budget"), "has(self.tokens) || has(self.steps)",
            "set budget.tokens or budget.steps (a run needs an end)"),
    CelRule(("spec", "data"), "self.sources.all(s, self.sources.exists_one(t, t.name == s.name))",
            "source names must be unique"),
    CelRule(("spec", "data"), "self.sources.exists(s, s.role == 'domain')",
            "the mixture needs at least one source with role 'domain'"),
    CelRule(("spec", "data"), "(has(self.strategy) && self.strategy == 'curriculum') || "
            "self.sources.all(s, !has(s.schedule))",
            "a source has a schedule but strategy is not 'curriculum'"),
    CelRule(("spec", "data", "sources", "[]", "schedule"), "size(self) >= 2",
            "schedule needs at least two points"),
    CelRule(("spec", "data", "sources", "[]", "schedule"),
            "self.map(p, p.tokens).isSorted() && self.all(p, self.exists_one(q, q.tokens == p.tokens))",
            "schedule points must have strictly increasing tokens"),
    CelRule(("spec", "gates", "[]"), f"!(has(self.relative) ? self.relative : {str(_RELATIVE).lower()}) "
            "|| self.threshold <= 1.0",
            "a relative threshold is a fraction: at most 1 (100% worse)"),
    CelRule(("spec",), "!has(self.training) || !has(self.training.parallelism) || "
            "!has(self.training.parallelism.strategy) || self.training.parallelism.strategy != 'hsdp' || "
            "(has(self.resources) && has(self.resources.nodes) && self.resources.nodes >= 2)",
            "training.parallelism.strategy hsdp replicates across nodes: it needs resources.nodes >= 2"),
    CelRule(("spec", "training", "parallelism"), "!has(self.cpuOffload) || !self.cpuOffload || "
            "!has(self.strategy) || self.strategy != 'ddp'",
            "cpuOffload needs strategy fsdp or hsdp (ddp keeps full replicas)"),
    CelRule(("spec", "evaluation"), "self.suites.all(s, self.suites.exists_one(t, t.name == s.name))",
            "evaluation suite names must be unique"),
    CelRule(("spec", "evaluation", "suites", "[]"), "has(self.uri) || has(self.benchmark) || "
            "(has(self.code) && has(self.code.problems))",
            "uri is required (the suite's texts or prompts) unless the suite is a benchmark or reads code.problems"),
    CelRule(("spec", "evaluation", "suites", "[]"), "!has(self.benchmark) || (has(self.metric) && "
            "self.metric in ['acc', 'acc_norm', 'exact_match'] && self.kind != 'drift')",
            "a benchmark suite reports acc, acc_norm or exact_match for a kind other than drift"),
    CelRule(("spec", "evaluation", "suites", "[]"),
            "has(self.code) == (has(self.metric) && self.metric in ['pass_at_1', 'pass_at_k']) "
            "&& (!has(self.code) || !(self.kind in ['drift', 'safety']))",
            "a code suite (with `code`) reports pass_at_1 or pass_at_k, and those need `code`, for a kind other "
            "than drift or safety"),
    CelRule(("spec", "evaluation", "suites", "[]", "code"),
            f"(has(self.k) ? self.k : {_CODE_K}) <= (has(self.samples) ? self.samples : {_CODE_SAMPLES})",
            "code.k must not exceed code.samples"),
)
