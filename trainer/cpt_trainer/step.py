"""One optimizer step: the token-weighted loss over the whole global batch, its gradient, and
the anomaly verdict that decides whether the update is applied.

The loss is token-weighted over all micro-batches of all ranks, so gradient accumulation and
the world size change the throughput, never the objective. The KL-to-base term (replay windows
only) is added here too, since it shares the forward pass.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cpt_api.spec import GradientSpec, TrainingSpec

from . import distributed
from .anomaly import AnomalyDetector, Verdict
from .data import Batch
from .data.curation import dropped_shares, starvation, starved_sources
from .errors import Refused
from .hooks import RunHook
from .parallel import Parallel
from .refkl import replay_kl
from .schedule import Schedule

IGNORE = -100


@dataclass
class StepOutcome:
    loss: float
    grad_norm: float
    tokens: int
    verdict: Verdict | None
    source_losses: dict[str, float] = field(default_factory=dict)
    dropped_shares: dict[str, float] = field(default_factory=dict)
    """Per source, the share of the documents read so far (all ranks) that curation dropped."""


class Objective:
    """Per-token NLL of a micro-batch and the KL-to-base term on its replay tokens."""

    def __init__(self, parallel: Parallel, *, device: torch.device, autocast_dtype: torch.dtype | None,
                 flatten: bool, beta: float, reference: Any, replay_ids: list[int]):
        self.parallel, self.device, self.autocast_dtype = parallel, device, autocast_dtype
        self.flatten = flatten
        """Flash-attention honours per-document positions only in a single packed row."""
        self.beta, self.reference, self.replay_ids = beta, reference, replay_ids

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token NLL [B, T-1], its mask, and the KL-to-base term (summed)."""
        batch = batch.to(self.device)
        labels = batch.labels[:, 1:]
        inputs = batch.model_inputs(flatten=self.flatten)
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype) \
            if self.autocast_dtype else contextlib.nullcontext()
        with autocast:
            logits = self.parallel.forward(**inputs).logits.view(*batch.input_ids.shape, -1)[:, :-1]
        logits = logits.float()
        mask = labels != IGNORE
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.clamp(min=0).reshape(-1),
                              reduction="none").view_as(labels) * mask
        kl = torch.zeros((), device=self.device)
        if self.beta > 0 and self.reference is not None and self.replay_ids:
            replay = torch.isin(batch.source_ids[:, 1:],
                                torch.tensor(self.replay_ids, device=self.device)) & mask
            # Entered on every micro-batch when the reference is sharded (a collective).
            term = replay_kl(self.reference, batch, logits, replay, flatten=self.flatten,
                             collective=self.parallel.sharded, autocast=autocast)
            if term is not None:
                kl = self.beta * term
        return nll, mask, kl


class TrainStep:
    """Draws a step's micro-batches, accumulates their gradients, clips, and applies the update
    unless the anomaly detector flags the step."""

    def __init__(self, objective: Objective, *, training: TrainingSpec, gradient: GradientSpec,
                 max_dropped_share: float, optimizer: torch.optim.Optimizer, schedule: Schedule,
                 data: Any, hook: RunHook, anomaly: AnomalyDetector, metrics: Any, world_size: int):
        self.objective, self.training, self.gradient = objective, training, gradient
        self.max_dropped_share = max_dropped_share
        self.optimizer, self.schedule, self.data, self.hook = optimizer, schedule, data, hook
        self.anomaly, self.metrics, self.world_size = anomaly, metrics, world_size

    def __call__(self, step: int) -> StepOutcome:
        """Optimizer step `step + 1` (its LR is the schedule's at `step`)."""
        t, device, parallel = self.training, self.objective.device, self.objective.parallel
        micro = [self.data.next_batch(t.micro_batch_size) for _ in range(t.grad_accumulation)]
        counts = torch.tensor([float(sum(b.num_tokens for b in micro))], device=device)
        n_global = max(1.0, distributed.all_reduce_sum(counts).item())
        # DDP averages gradients over ranks; scaling by world size makes that a global token mean.
        scale = self.world_size / n_global
        lr = self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        names = self.data.source_names
        totals = self._document_totals(names, device)
        for i, batch in enumerate(micro):
            with parallel.accumulating(last=i == len(micro) - 1):
                nll, mask, kl = self.objective(batch)
                ((nll.sum() + kl) * scale).backward()  # type: ignore[no-untyped-call]  # unannotated in torch
            with torch.no_grad():
                self.hook.observe(batch, nll.detach())
                src = batch.source_ids[:, 1:].to(device)[mask]
                totals[0].index_add_(0, src, nll.detach()[mask].double())
                totals[1].index_add_(0, src, torch.ones_like(src, dtype=totals.dtype))
        grad_norm = parallel.clip(self.gradient.clip)
        distributed.all_reduce_sum(totals)
        self.hook.end_step(self.metrics)
        nll_sums, counts_by_source, read_all, kept_all = totals.tolist()
        read, kept = dict(zip(names, read_all)), dict(zip(names, kept_all))
        self._check_starvation(read, kept)
        loss = sum(nll_sums) / n_global
        source_losses = {name: total / count for name, total, count in zip(names, nll_sums, counts_by_source)
                         if count > 0}
        verdict = self.anomaly.observe(loss, grad_norm, source_losses)
        if verdict is None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss, grad_norm, int(n_global), verdict, source_losses,
                           dropped_shares(read, kept))

    def _document_totals(self, names: list[str], device: torch.device) -> torch.Tensor:
        """Per source: summed NLL and counted tokens (their sums are the step's loss), and the
        documents curation has read and kept so far on this rank; one all-reduce carries all."""
        read_here, kept_here = self.data.documents()
        totals = torch.zeros(4, len(names), dtype=torch.float64, device=device)
        totals[2] = torch.tensor([read_here.get(n, 0) for n in names], dtype=torch.float64)
        totals[3] = torch.tensor([kept_here.get(n, 0) for n in names], dtype=torch.float64)
        return totals

    def _check_starvation(self, read: dict[str, float], kept: dict[str, float]) -> None:
        limit = self.max_dropped_share
        if starved_sources(read, kept, limit):  # on every rank: the counts are global
            dropped_by = self.data.curation_report().get("droppedBySource", {})
            raise Refused(starvation(read, kept, limit, dropped_by))


__all__ = ["IGNORE", "Objective", "StepOutcome", "TrainStep"]
