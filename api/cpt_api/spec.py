"""The CptRun spec: the one source of truth for the CRD, the local runner and the trainer.

Cross-field rules live here as validators; the CRD carries the same rules as CEL
(see `cel_rules.py`), so a cluster rejects what `cptctl validate` rejects. The sections are
modules of their own (`base_model`, `data`, `training`, `resources`, `evaluation`); this module
assembles them into `CptRunSpec` and the `CptRun` object, checks the rules that span sections,
and re-exports every section's names, so `from cpt_api.spec import X` reads any of them.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import SpecModel
from .base_model import BaseModelSpec, ModelFormat, RestoreMode, TokenizerExtensionSpec, TokenizerSpec
from .data import (GOPHER_STOP_WORDS, Boundary, CurationSpec, DataSource, DataSpec, MixtureStrategy, PackingSpec,
                   QualitySpec, SourceFormat, SourceRole, WeightPoint)
from .evaluation import EvaluationSpec, GateSpec, SelectionSpec, StopPolicySpec, SuiteKind, SuiteSpec
from .quantity import QUANTITY_PATTERN
from .resources import MAX_NODES, ResourcesSpec, Toleration
from .storage import URI_PATTERN
from .training import (ActivationCheckpointing, AnomalySpec, BudgetSpec, CheckpointSpec, DecayKind, GradientSpec,
                       NonFiniteAction, OptimizerSpec, ParallelismSpec, Precision, RefKLSpec, RegularizationSpec,
                       ScheduleSpec, Sharding, TrainingSpec)

__all__ = [
    # the run object and the spec assembled here
    "API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION", "CptRun", "CptRunSpec", "ObjectMeta",
    # base model and tokenizer (base_model)
    "BaseModelSpec", "ModelFormat", "RestoreMode", "TokenizerExtensionSpec", "TokenizerSpec",
    # data (data)
    "GOPHER_STOP_WORDS", "Boundary", "CurationSpec", "DataSource", "DataSpec", "MixtureStrategy", "PackingSpec",
    "QualitySpec", "SourceFormat", "SourceRole", "WeightPoint",
    # training (training)
    "ActivationCheckpointing", "AnomalySpec", "BudgetSpec", "CheckpointSpec", "DecayKind", "GradientSpec",
    "NonFiniteAction", "OptimizerSpec", "ParallelismSpec", "Precision", "RefKLSpec", "RegularizationSpec",
    "ScheduleSpec", "Sharding", "TrainingSpec",
    # resources (resources)
    "MAX_NODES", "ResourcesSpec", "Toleration",
    # evaluation, gates, stop policy and selection (evaluation)
    "EvaluationSpec", "GateSpec", "SelectionSpec", "StopPolicySpec", "SuiteKind", "SuiteSpec",
    # shared building blocks the spec has always exported
    "QUANTITY_PATTERN", "URI_PATTERN", "SpecModel",
]


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
