"""Whether an attempt may start: the checks both backends run before they carry out a start, in
one place (pure: what they depend on is read through a `StartProbe` the backend implements).

In order, and the first that fails decides:

1. the platform's allow-lists (`policy.tenancy`): a run outside them is refused (NotAllowed);
2. the memory plan (`policy.memory_fix`), when the spec names GPU or pod memory: a run that
   cannot fit is refused with the smallest fix (WontFit); a base whose shape cannot be read is
   not a reason to refuse, only reported (MemoryPlanned=False, PlanUnavailable);
3. Kueue, when `resources.queue` names a queue: without it a queued Job never starts
   (KueueNotInstalled);
4. the checkpoint root: claimed for this run before its first attempt, once 1-3 passed (a
   refused run never takes a root), and refused when another run holds it (CheckpointUriInUse:
   `check_root`).

Then, before any plan whose trainer prunes checkpoints (a start, or a stop that saves), the pins
must be written (`pins_hold`): a pin the store refused holds the plan, retried on the next pass
(CheckpointsPinned=False), since the trainer would otherwise prune by stale pins.

The probe is called lazily, in this order, so that a backend reads nothing it need not: a run
outside the allow-lists has its base read by no one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from cpt_api import kueue
from cpt_api.spec import CptRunSpec
from cpt_api.status import Reason
from cpt_api.storage import summarise_error
from .memory_fix import checked, usages, wont_fit
from .model_shape import ModelShape


class StartProbe(Protocol):
    """What a backend reads, or does, for the checks: each method is called at most once per
    check, and only when the checks before it passed."""

    def tenancy_refusals(self, spec: CptRunSpec) -> list[str]:
        """Each way the spec leaves the platform's allow-lists (none where there is no platform)."""

    def base_shape(self, spec: CptRunSpec) -> ModelShape | str:
        """The base's shape, or why it cannot be read."""

    def queue_installed(self) -> bool:
        """Whether the queue the spec names can admit a Job (Kueue's API is served)."""


@dataclass(frozen=True)
class Verdict:
    """A check that failed: its reason (a SpecValid or CheckpointsPinned reason) and a message a
    person can act on."""
    reason: Reason
    message: str


@dataclass(frozen=True)
class MemoryNote:
    """What the memory plan says, for the MemoryPlanned condition: fits, or could not be made."""
    planned: bool
    reason: Reason
    message: str


@dataclass(frozen=True)
class StartCheck:
    refusal: Verdict | None = None
    memory: MemoryNote | None = None
    """None: the spec names no memory to plan against."""


def check_start(spec: CptRunSpec, probe: StartProbe) -> StartCheck:
    """Checks 1 to 3, for an attempt about to start on `spec`'s layout."""
    not_allowed = probe.tenancy_refusals(spec)
    if not_allowed:
        return StartCheck(Verdict(Reason.not_allowed, "; ".join(not_allowed)))
    memory: MemoryNote | None = None
    if checked(spec):
        shape = probe.base_shape(spec)
        if isinstance(shape, str):
            memory = MemoryNote(False, Reason.plan_unavailable, f"memory not planned: {shape}")
        else:
            problem = wont_fit(spec, shape)
            if problem is not None:
                return StartCheck(Verdict(Reason.wont_fit, problem))
            memory = MemoryNote(True, Reason.fits, "; ".join(map(str, usages(spec, shape))))
    if spec.resources.queue and not probe.queue_installed():
        return StartCheck(Verdict(Reason.kueue_not_installed, queue_missing(spec.resources.queue)), memory)
    return StartCheck(None, memory)


def check_root(owner_problem: str | None) -> Verdict | None:
    """Check 4, once the backend claimed the root: `owner_problem` is
    `cpt_api.ownership.owner_problem` of the claim (why the root is another run's)."""
    return None if owner_problem is None else Verdict(Reason.checkpoint_uri_in_use, owner_problem)


def pins_hold(refused: str | None) -> Verdict | None:
    """A plan that prunes waits while its pins are not written (`refused`: why the store refused
    them); it is tried again on the next pass."""
    return None if refused is None else Verdict(Reason.pin_failed, refused)


def pin_failure(names: Sequence[str], error: BaseException) -> str:
    """Why a plan waits for its pins, as both backends record it."""
    return f"pinning {', '.join(names)} failed (retrying): {summarise_error(error)}"


def queue_missing(queue: str) -> str:
    return (f"resources.queue is {queue!r} but this cluster has no Kueue (no "
            f"{kueue.WORKLOADS}.{kueue.GROUP} API): a queued Job would never start. Install Kueue "
            "(see the chart's README) or remove resources.queue")

