"""Attempt bookkeeping: one attempt's pods at a time, where a restarted attempt continues, the
bounded restarts after a failure, and the sweep of other attempts' leftovers.

An attempt is one Job (or one torchrun) with its own number; the run moves on by starting the
next one, never by reusing one, so each rule here is about which attempt may exist and from
which checkpoint the next begins.
"""
from __future__ import annotations

from cpt_api.manifest import attempt_folder
from cpt_api.status import ConditionType, Phase, Reason
from .actions import Sweep
from .planner import Planner, set_condition


def latest_in_lineage(p: Planner) -> str | None:
    """Where a restarted attempt continues: the current attempt's newest checkpoint, else
    the point it started from."""
    prefix = f"{attempt_folder(p.status.attempt)}/"
    own = [c for c in p.obs.checkpoints if c.name.startswith(prefix)]
    if own:
        return max(own, key=lambda c: c.step).name
    return p.status.restore_from


def restart_after_failure(p: Planner, message: str) -> None:
    st = p.status
    limit = p.spec.stop_policy.max_attempt_restarts
    if st.restarts >= limit:
        p.finish(Phase.failed, "AttemptFailed", f"attempt {st.attempt} failed ({message}); "
                 f"{st.restarts} restarts used of {limit}")
        return
    st.restarts += 1
    set_condition(st, ConditionType.degraded, True, "AttemptFailed", message, p.obs.now)
    p.start(latest_in_lineage(p), f"restart {st.restarts}/{limit} after: {message}")


def sweep_strays(p: Planner) -> None:
    """Objects of any attempt but the current one go, whatever the phase: an older attempt's
    leftovers, or a newer attempt whose start was never recorded in status (an operator killed
    between creating it and writing status), which a later start must not adopt as its own."""
    strays = p.obs.strays
    if not strays:
        return
    p.status.attempts_seen = max(p.status.attempts_seen, *strays)
    p.actions.append(Sweep(tuple(sorted(strays))))
    for number in sorted(strays):
        kinds = ", ".join(sorted(set(strays[number])))
        if number > p.status.attempt:
            p.emit("Warning", Reason.stray_swept.value, f"deleted attempt {number} ({kinds}): it was created "
                   f"but never recorded in status, whose attempt is {p.status.attempt}")
        else:
            p.emit("Normal", Reason.stray_swept.value, f"deleted what was left of attempt {number} ({kinds})")


def must_wait(p: Planner) -> bool:
    """True while another attempt could still hold pods (and GPUs): the next attempt starts only
    once they are gone, so at most one attempt's pods run at any time. Nothing is decided
    meanwhile; the pass that finds them gone decides afresh."""
    obs = p.obs
    busy = {*obs.pods_left, *obs.strays, *([obs.attempt.number] if obs.attempt.state == "running" else [])}
    if not busy:
        return False
    which = ", ".join(str(n) for n in sorted(busy))
    set_condition(p.status, ConditionType.progressing, True, Reason.waiting_for_pods.value,
                  f"the next attempt starts once the pods of attempt {which} are gone", obs.now)
    return True
