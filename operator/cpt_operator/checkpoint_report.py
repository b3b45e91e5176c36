"""`cptctl checkpoints RUN`: the checkpoint table and, on request, the curves as a PNG.

Frontier, gate passes, J and the choice are the policy's (`policy.pareto.select_checkpoint`):
with the run's spec they are recomputed from the metrics, otherwise the values the control
plane stored in the status (computed by the same function) are shown. The stability gap is
`Δ_stab(t) = M_g(t) − M_g(0)` per general suite, read as "how much worse than the base"
(`api.metrics.worse_by`, so a perplexity rise and an accuracy drop both count as positive).

The plot (matplotlib, no torch): one panel per suite kind (domain, general, behaviour and safety
as rates, drift), over tokens seen (steps when tokens were not recorded); one line per attempt,
the base as a dotted horizontal line, each `baseline: base` gate's limit as a dash-dot line, the
stability gap shaded where a general metric is worse than the base, frontier checkpoints
circled, the chosen one starred, rollbacks as vertical lines.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpt_api.evaluation import Metric
from cpt_api.spec import CptRunSpec
from cpt_api.status import BASE, CptRunStatus
from .policy import CheckpointEvals, EvalPoint, select_checkpoint
from .policy.headroom import headroom
from cpt_api.manifest import attempt_of as attempt_number
from cpt_api.metrics import gate_limit, metric_key, worse_by

if TYPE_CHECKING:
    from matplotlib.axes import Axes

_AXES = ("domain", "general", "behavior", "safety", "drift", "custom")
_RATES = {Metric.json_valid, Metric.format_follow, Metric.refusal_rate}
NEW_TOKEN_PREFIXES = ("new_token.", "new_tokens.")
LEGEND = ("o on the Pareto frontier over (domain, general, safety) gains, the base included; "
          "* chosen: highest J above the base's 0 among checkpoints that pass every gate and that "
          "neither the base nor another passing checkpoint dominates; else the base")


@dataclass(frozen=True)
class Row:
    name: str
    attempt: int
    step: int
    tokens: int
    metrics: Mapping[str, float]
    score: float | None
    passed: bool | None
    frontier: bool
    chosen: bool


def attempt_of(name: str) -> int:
    """The attempt of a checkpoint name; 1 for a name without one (a run's first checkpoints)."""
    return attempt_number(name) or 1


@dataclass(frozen=True)
class Choice:
    """The base's place in the choice: on the frontier, chosen (nothing beats it), and why."""

    base_frontier: bool
    base_chosen: bool
    verdict: str | None


def rows_of(status: CptRunStatus, spec: CptRunSpec | None = None) -> list[Row]:
    """One row per checkpoint, in the order they were written (attempt, step)."""
    return choice_of(status, spec)[0]


def choice_of(status: CptRunStatus, spec: CptRunSpec | None = None) -> tuple[list[Row], Choice]:
    """The rows and the base's place, recomputed with the spec, else as the status has them."""
    ckpts = sorted(status.checkpoints, key=lambda c: (attempt_of(c.name), c.step, c.name))
    if spec is None:
        frontier = set(status.frontier) | {c.name for c in ckpts if c.on_frontier}
        verdict = status.verdict or None
        return ([Row(c.name, attempt_of(c.name), c.step, c.tokens, c.metrics, c.score,
                     c.passed_gates, c.name in frontier, c.name == status.best_checkpoint)
                 for c in ckpts],
                Choice(BASE in frontier, status.best_checkpoint == BASE, verdict))
    sel = select_checkpoint(spec, status.base_metrics, [
        CheckpointEvals(name=c.name, step=c.step, tokens=c.tokens, evals=c.metrics,
                        attempt=attempt_of(c.name)) for c in ckpts])
    return ([Row(c.name, attempt_of(c.name), c.step, c.tokens, c.metrics, sel.scores.get(c.name),
                 sel.passed.get(c.name), c.name in sel.frontier, c.name == sel.chosen)
             for c in ckpts],
            Choice(BASE in sel.frontier, sel.chosen == BASE, sel.verdict.message if sel.verdict else None))


def axis_of(key: str, spec: CptRunSpec | None) -> str:
    """The suite kind behind a `suite.metric` key (by name when the spec is not at hand)."""
    suite = key.rsplit(".", 1)[0]
    if spec is not None and spec.evaluation is not None:
        for s in spec.evaluation.suites:
            if s.name == suite:
                return s.kind.value
    return next((axis for axis in _AXES if axis in suite), "custom")


def metric_of(key: str) -> Metric | None:
    try:
        return Metric(key.rsplit(".", 1)[-1])
    except ValueError:
        return None


def is_new_token_key(key: str) -> bool:
    """Training counters of tokens added by tokenizer extension (`new_token.<term>.loss|seen`,
    `new_tokens.*`): shown in their own section, not as metric columns."""
    return key.startswith(NEW_TOKEN_PREFIXES)


def metric_keys(status: CptRunStatus, spec: CptRunSpec | None) -> list[str]:
    keys = set(status.base_metrics)
    for c in status.checkpoints:
        keys.update(c.metrics)
    keys = {k for k in keys if not is_new_token_key(k)}
    return sorted(keys, key=lambda k: (_AXES.index(axis_of(k, spec)), k))


def new_token_lines(rows: Sequence[Row]) -> list[str]:
    """Per added token at the latest checkpoint that has them: targets seen so far and the mean
    loss since the previous checkpoint (under-trained rows show as few targets, high loss)."""
    latest = next((r for r in reversed(rows) if "new_tokens.seen" in r.metrics), None)
    if latest is None:
        return []
    m = latest.metrics
    total = f"{_fmt(m.get('new_tokens.loss'))} mean loss, {int(m['new_tokens.seen'])} targets, " \
        f"{int(m.get('new_tokens.unseen', 0))} tokens never seen"
    lines = [f"new tokens at {latest.name}: {total}"]
    terms = sorted({k[len("new_token."):].rsplit(".", 1)[0] for k in m
                    if k.startswith("new_token.")})
    width = max([len("token")] + [len(t) for t in terms])
    if terms:
        lines.append(f"  {'token':<{width}}  {'seen':>8}  loss")
    for term in sorted(terms, key=lambda t: (m.get(f"new_token.{t}.seen", 0), t)):
        seen = m.get(f"new_token.{term}.seen")
        lines.append(f"  {term:<{width}}  {int(seen) if seen is not None else '-':>8}  "
                     f"{_fmt(m.get(f'new_token.{term}.loss'))}")
    return lines


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def table(status: CptRunStatus, rows: Sequence[Row], keys: Sequence[str],
          choice: Choice | None = None) -> list[str]:
    header = ["", "checkpoint", "step", "tokens", *keys, "J", "gates"]
    mark = "" if choice is None else "*" if choice.base_chosen else "o" if choice.base_frontier else ""
    body = [[mark, BASE, "0", "0", *[_fmt(status.base_metrics.get(k)) for k in keys], "0", "-"]]
    for r in rows:
        mark = "*" if r.chosen else "o" if r.frontier else ""
        gates = "-" if r.passed is None else "pass" if r.passed else "FAIL"
        body.append([mark, r.name, str(r.step), f"{r.tokens:,}",
                     *[_fmt(r.metrics.get(k)) for k in keys], _fmt(r.score), gates])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    left = {0, 1}
    return ["  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
            for line in [header, *body]]


def base_to_chosen(spec: CptRunSpec, base: Mapping[str, float],
                   chosen: Mapping[str, float]) -> list[str]:
    """Each metric's base -> chosen value with the gates on it (limit, headroom), then whether
    every gate held at the chosen checkpoint."""
    rooms = headroom(spec, base, [EvalPoint(attempt=0, step=0, metrics=chosen)])
    suites = spec.suites_by_name()
    lines = []
    for key in sorted(set(base) & set(chosen), key=lambda k: (_AXES.index(axis_of(k, spec)), k)):
        gates = []
        for gate, room in ((g, r) for g in spec.gates for r in rooms if r.gate == g.name and r.metric == key):
            limit = gate_limit(gate, suites[gate.suite], base)
            at = f"limit {_fmt(limit)}, " if limit is not None else ""
            gates.append(f"gate {gate.name}: {at}{'held' if room.left >= 0 else 'BREACHED'} "
                         f"({room.text().rsplit(' ', 1)[-1]} left)")
        lines.append(f"{key}: {_fmt(base[key])} -> {_fmt(chosen[key])}"
                     + (f"   {'; '.join(gates)}" if gates else ""))
    breached = [r.gate for r in rooms if r.left < 0]
    judged = {r.gate for r in rooms}
    unjudged = [g.name for g in spec.gates if g.name not in judged]
    verdict = f"breached: {', '.join(breached)}" if breached else "every gate held"
    lines.append(verdict + (f" (not judged: {', '.join(unjudged)})" if unjudged else ""))
    return lines


def stability_gaps(status: CptRunStatus, rows: Sequence[Row], keys: Sequence[str],
                   spec: CptRunSpec | None) -> list[str]:
    """The worst general regression against the base, per general metric."""
    lines = []
    for key in keys:
        metric, base = metric_of(key), status.base_metrics.get(key)
        seen = [(r, r.metrics[key]) for r in rows if key in r.metrics]
        if axis_of(key, spec) != "general" or metric is None or base is None or not seen:
            continue
        worst, value = max(seen, key=lambda rv: worse_by(metric, rv[1], base))
        gap = worse_by(metric, value, base)
        rel = f" ({gap / abs(base):+.1%})" if base else ""
        latest = seen[-1][1]
        lines.append(f"stability gap {key}: worst {gap:+.4g}{rel} at {worst.name} "
                     f"(base {_fmt(base)} -> {_fmt(value)}); latest {_fmt(latest)}")
    return lines


def render_report(status: CptRunStatus, plot: str | None = None, *,
                  spec: CptRunSpec | None = None) -> str:
    """The `cptctl checkpoints` text; writes the curves to `plot` (a PNG path) when given."""
    if not status.checkpoints:
        return "no checkpoints yet"
    (rows, choice), keys = choice_of(status, spec), metric_keys(status, spec)
    lines = table(status, rows, keys, choice) + ["", LEGEND]
    chosen = next((r for r in rows if r.chosen), None)
    if choice.base_chosen:
        lines.append(f"chosen: the base. {choice.verdict or 'No checkpoint is better than the base.'}")
    else:
        lines.append(f"chosen: {chosen.name} (J = {_fmt(chosen.score)})" if chosen else
                     "chosen: none (no checkpoint has every metric selection needs)")
    lines += stability_gaps(status, rows, keys, spec)
    lines += new_token_lines(rows)
    for rec in status.history:
        value = f" {rec.metric}={_fmt(rec.value)} vs {_fmt(rec.baseline)}" if rec.metric else ""
        lines.append(f"rollback after attempt {rec.attempt}: {rec.gate}{value} -> {rec.target}")
    if plot:
        write_plot(status, rows, keys, plot, spec)
        lines.append(f"plot written to {plot}")
    return "\n".join(lines)


def write_plot(status: CptRunStatus, rows: Sequence[Row], keys: Sequence[str], path: str,
               spec: CptRunSpec | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    panels = [(axis, [k for k in keys if axis_of(k, spec) == axis]) for axis in _AXES]
    panels = [(axis, ks) for axis, ks in panels if ks] or [("metrics", list(keys))]
    use_tokens = any(r.tokens for r in rows)
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                             figsize=(9, 3.2 * len(panels)))
    for ax, (axis, ks) in zip(axes[:, 0], panels):
        for i, key in enumerate(ks):
            _plot_metric(ax, status, rows, key, f"C{i}", use_tokens, shade=axis == "general")
        _mark_rollbacks(ax, status, rows, use_tokens)
        _mark_gate_limits(ax, status, ks, spec)
        if all(metric_of(k) in _RATES for k in ks):
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{axis}   (dotted: base; dash-dot: gate limit; o frontier; * chosen; "
                     f"shaded: worse than base)", loc="left", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("tokens seen" if use_tokens else "step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_metric(ax: Axes, status: CptRunStatus, rows: Sequence[Row], key: str, color: str,
                 use_tokens: bool, *, shade: bool) -> None:
    base, metric = status.base_metrics.get(key), metric_of(key)
    starts = _restore_points(status, rows)
    last_attempt = max(r.attempt for r in rows)
    for attempt in sorted({r.attempt for r in rows}):
        own = [r for r in rows if r.attempt == attempt and key in r.metrics]
        if not own:
            continue
        start = starts.get(attempt)
        line = ([start] if start is not None and key in start.metrics else []) + own
        xs, ys = [_x(r, use_tokens) for r in line], [r.metrics[key] for r in line]
        if start is None and base is not None and _from_base(status, attempt):
            xs, ys = [0, *xs], [base, *ys]  # the curve starts where the attempt did: the base
        ax.plot(xs, ys, marker=".", color=color, alpha=1.0 if attempt == last_attempt else 0.45,
                linestyle="-" if attempt == last_attempt else "--",
                label=f"{key} (attempt {attempt})")
        if shade and base is not None and metric is not None:
            worse = [worse_by(metric, y, base) > 0 for y in ys]
            ax.fill_between(xs, ys, base, where=worse, interpolate=True, color=color, alpha=0.15)
        for r in own:
            if r.frontier:
                ax.scatter([_x(r, use_tokens)], [r.metrics[key]], s=90, facecolors="none",
                           edgecolors="black", zorder=3)
            if r.chosen:
                ax.scatter([_x(r, use_tokens)], [r.metrics[key]], s=180, marker="*", color="gold",
                           edgecolors="black", zorder=4)
    if base is not None:
        ax.axhline(base, color=color, linestyle=":", linewidth=1)


def _mark_gate_limits(ax: Axes, status: CptRunStatus, keys: Sequence[str],
                      spec: CptRunSpec | None) -> None:
    """A dash-dot line at the value where each `baseline: base` gate on these metrics breaches
    (`api.metrics.gate_limit`, the limit the policy enforces)."""
    if spec is None:
        return
    suites = spec.suites_by_name()
    for gate in spec.gates:
        suite = suites.get(gate.suite)
        limit = None if suite is None else gate_limit(gate, suite, status.base_metrics)
        if suite is None or limit is None or metric_key(suite) not in keys:
            continue
        ax.axhline(limit, color="red", linestyle="-.", linewidth=1)
        ax.annotate(f"gate {gate.name}", (0.0, limit), xycoords=("axes fraction", "data"),
                    fontsize=7, color="red", va="bottom")


def _x(row: Row, use_tokens: bool) -> int:
    return row.tokens if use_tokens else row.step


def _restore_points(status: CptRunStatus, rows: Sequence[Row]) -> dict[int, Row]:
    """Attempt -> the checkpoint it restored from, so its curve starts where it really did."""
    by_name = {r.name: r for r in rows}
    return {rec.attempt + 1: by_name[rec.target] for rec in status.history if rec.target in by_name}


def _from_base(status: CptRunStatus, attempt: int) -> bool:
    """Did this attempt start from the base (the first one, or a rollback to the base)?"""
    if attempt == 1:
        return True
    return any(rec.attempt + 1 == attempt and rec.target == "base" for rec in status.history)


def _mark_rollbacks(ax: Axes, status: CptRunStatus, rows: Sequence[Row], use_tokens: bool) -> None:
    """A vertical line where each rolled-back attempt's last checkpoint was written, naming every
    gate that fired there (several gates can end one attempt)."""
    gates: dict[int, list[str]] = {}
    for rec in status.history:
        gates.setdefault(rec.attempt, []).append(rec.gate)
    for attempt, names in gates.items():
        ends = [_x(r, use_tokens) for r in rows if r.attempt == attempt]
        if ends:
            ax.axvline(max(ends), color="red", linestyle=":", linewidth=1.2)
            ax.annotate(f" rollback ({', '.join(names)})", (max(ends), 0.02),
                        xycoords=("data", "axes fraction"), fontsize=7, color="red")
