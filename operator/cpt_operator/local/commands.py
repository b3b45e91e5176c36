"""`cptctl status | stop | rollback | checkpoints` for local runs (run directories)."""
from __future__ import annotations

import json
import sys

from .rundir import RunDir


def _open(run: str) -> RunDir | None:
    try:
        return RunDir.find(run)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def show_status(run: str, *, as_json: bool = False) -> int:
    rd = _open(run)
    if rd is None:
        return 2
    status = rd.read_status()
    if as_json:
        print(status.model_dump_json(by_alias=True, exclude_none=True, indent=2))
        return 0
    print(f"phase:       {status.phase.value}  {status.message}")
    print(f"attempt:     {status.attempt} (from {status.restore_from or 'base'}; lr x{status.overrides.lr_scale:g}, "
          f"replay +{status.overrides.replay_delta:g})")
    print(f"progress:    step {status.step}, {status.tokens:,} tokens")
    print(f"checkpoints: last {status.last_checkpoint or '-'}, last good {status.last_good_checkpoint or '-'}, "
          f"chosen {status.best_checkpoint or '-'}")
    print(f"rollbacks:   {status.rollbacks}, restarts: {status.restarts}")
    for rec in status.history:
        value = f" {rec.metric}={rec.value:.4g} (baseline {rec.baseline:.4g})" if rec.value is not None and rec.baseline is not None else ""
        print(f"  - attempt {rec.attempt}: {rec.gate}{value} -> {rec.target}; {rec.reason}")
    for cond in status.conditions:
        print(f"  {cond.type}={cond.status} ({cond.reason}) {cond.message}")
    return 0


def request_stop(run: str) -> int:
    rd = _open(run)
    if rd is None:
        return 2
    rd.request("stop", {"by": "cptctl"})
    print(f"stop requested for {rd.root.name}; the runner stops after a consistent checkpoint")
    return 0


def request_rollback(run: str, to: str) -> int:
    rd = _open(run)
    if rd is None:
        return 2
    rd.request("rollback", {"to": to})
    print(f"rollback to {to} requested for {rd.root.name}")
    return 0


def show_checkpoints(run: str, *, plot: str | None = None, as_json: bool = False) -> int:
    rd = _open(run)
    if rd is None:
        return 2
    status = rd.read_status()
    if as_json:
        print(json.dumps([c.dump() for c in status.checkpoints], indent=2))
        return 0
    from ..api import load_run
    from ..checkpoint_report import render_report  # matplotlib only when asked for

    spec = load_run(rd.spec_file).spec if rd.spec_file.exists() else None
    print(render_report(status, plot=plot, spec=spec))
    return 0
