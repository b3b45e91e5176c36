"""`cptctl checkpoints`: the table marks the frontier and the choice; the plot is a real PNG."""
from __future__ import annotations

from pathlib import Path

import pytest

from cpt_api.evaluation import GateSpec
from cpt_api.spec import CptRunSpec
from cpt_api.status import CheckpointSummary, Condition, CptRunStatus, RollbackRecord
from cpt_operator.checkpoint_report import _mark_gate_limits, base_to_chosen, render_report

SUITES = [
    {"name": "domain", "kind": "domain", "uri": "/e/d.jsonl"},
    {"name": "general", "kind": "general", "uri": "/e/g.jsonl"},
    {"name": "safety", "kind": "safety", "uri": "/e/s.jsonl", "metric": "refusal_rate"},
]
BASE = {"domain.perplexity": 20.0, "general.perplexity": 10.0, "safety.refusal_rate": 0.9}
# (name, step, tokens, domain ppl, general ppl). Gains over the base (domain, general):
#   a1/s100 (+0.10, -0.05)  dominated by a2/s150
#   a1/s200 (+0.20, -0.20)  frontier (best domain), but general is 20% worse: fails the gate
#   a2/s150 (+0.15, -0.02)  frontier, passes, J = 0.13: the choice
#   a2/s250 (+0.125, -0.04) dominated by a2/s150
CHECKPOINTS = [("attempt-001/step-00000100", 100, 100_000, 18.0, 10.5),
               ("attempt-001/step-00000200", 200, 200_000, 16.0, 12.0),
               ("attempt-002/step-00000150", 150, 150_000, 17.0, 10.2),
               ("attempt-002/step-00000250", 250, 250_000, 17.5, 10.4)]


def spec() -> CptRunSpec:
    return CptRunSpec.model_validate({
        "baseModel": {"uri": "/m"}, "data": {"sources": [{"name": "d", "role": "domain", "uri": "/d"}]},
        "budget": {"steps": 1000}, "schedule": {"warmupSteps": 10},
        "evaluation": {"suites": SUITES},
        "gates": [{"name": "general-ppl", "suite": "general", "threshold": 0.1}]})


def status(**marks: dict[str, object]) -> CptRunStatus:
    """A status as the control plane would store it; `marks` overrides per checkpoint name."""
    ckpts = [CheckpointSummary(name=n, step=s, tokens=t, metrics={
                 "domain.perplexity": d, "general.perplexity": g, "safety.refusal_rate": 0.9},
                 **marks.get(n, {})) for n, s, t, d, g in CHECKPOINTS]
    return CptRunStatus(base_metrics=BASE, checkpoints=ckpts, history=[RollbackRecord(
        attempt=1, gate="general-ppl", metric="general.perplexity", value=12.0, baseline=10.0,
        target="attempt-001/step-00000100")])


def marks(report: str) -> dict[str, str]:
    """Checkpoint name -> its mark column ('*', 'o' or '')."""
    out = {}
    for line in report.split("\n\n")[0].splitlines():
        for name, *_ in CHECKPOINTS:
            if name in line.split():
                out[name] = line.split()[0] if line.split()[0] in ("*", "o") else ""
    return out


def row(report: str, name: str) -> list[str]:
    table = report.split("\n\n")[0].splitlines()
    return next(line.split() for line in table if name in line.split())


def test_with_the_spec_the_policy_decides_frontier_gates_and_choice() -> None:
    # Stale marks in the status must not leak into a report computed from the spec.
    stale = status(**{"attempt-001/step-00000100": {"on_frontier": True, "score": 9.0}})
    stale.best_checkpoint = "attempt-001/step-00000100"
    report = render_report(stale, spec=spec())
    assert marks(report) == {"attempt-001/step-00000100": "", "attempt-001/step-00000200": "o",
                             "attempt-002/step-00000150": "*", "attempt-002/step-00000250": ""}
    assert row(report, "attempt-001/step-00000200")[-1] == "FAIL"
    assert row(report, "attempt-002/step-00000150")[-2:] == ["0.13", "pass"]
    assert "chosen: attempt-002/step-00000150 (J = 0.13)" in report


def test_without_the_spec_the_stored_status_is_shown() -> None:
    st = status(**{"attempt-001/step-00000200": {"on_frontier": True, "score": 0.0, "passed_gates": False},
                   "attempt-002/step-00000150": {"on_frontier": True, "score": 0.13, "passed_gates": True}})
    st.best_checkpoint = "attempt-002/step-00000150"
    report = render_report(st)
    assert marks(report)["attempt-002/step-00000150"] == "*"
    assert marks(report)["attempt-001/step-00000200"] == "o"
    assert marks(report)["attempt-001/step-00000100"] == ""
    assert row(report, "attempt-001/step-00000100")[-2:] == ["-", "-"]


def test_base_row_stability_gap_and_rollbacks_are_reported() -> None:
    report = render_report(status(), spec=spec())
    # the base is on the frontier: its general perplexity is the best of all
    assert row(report, "base")[:7] == ["o", "base", "0", "0", "20", "10", "0.9"]
    assert ("stability gap general.perplexity: worst +2 (+20.0%) at attempt-001/step-00000200 "
            "(base 10 -> 12); latest 10.4") in report
    assert "rollback after attempt 1: general-ppl general.perplexity=12 vs 10" in report


@pytest.mark.parametrize("with_spec", [True, False], ids=["recomputed from the spec", "as the status has it"])
def test_a_run_with_nothing_better_than_the_base_marks_the_base_chosen(with_spec: bool) -> None:
    worse = status()
    for c in worse.checkpoints:
        c.metrics["domain.perplexity"] = 25.0  # the domain got worse everywhere
    worse.best_checkpoint, worse.frontier = "base", ["base"]
    worse.conditions = [Condition(type="Improved", status="False", reason="NoImprovement",
                                  message="no checkpoint is better than the base, so the base is the choice")]
    report = render_report(worse, spec=spec() if with_spec else None)
    assert row(report, "base")[0] == "*" and "*" not in marks(report).values()
    assert "chosen: the base. no checkpoint is better than the base" in report


def test_the_plot_is_a_valid_png(tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    report = render_report(status(), plot=str(out), spec=spec())
    assert f"plot written to {out}" in report
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 600  # two panels were drawn


def test_a_run_without_checkpoints_says_so() -> None:
    assert render_report(CptRunStatus()) == "no checkpoints yet"


def test_base_to_chosen_names_each_gate_its_limit_and_whether_it_held() -> None:
    lines = base_to_chosen(spec(), BASE, {**BASE, "domain.perplexity": 17.0, "general.perplexity": 10.2})
    assert "domain.perplexity: 20 -> 17" in lines
    assert "general.perplexity: 10 -> 10.2   gate general-ppl: limit 11, held (+8.0% left)" in lines
    assert lines[-1] == "every gate held"


def test_base_to_chosen_says_which_gate_broke() -> None:
    lines = base_to_chosen(spec(), BASE, {**BASE, "general.perplexity": 12.0})
    assert "general.perplexity: 10 -> 12   gate general-ppl: limit 11, BREACHED (-10.0% left)" in lines
    assert lines[-1] == "breached: general-ppl"


def test_every_suite_kind_gets_a_panel_with_its_gate_limit(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gated = spec().model_copy(update={"gates": [*spec().gates, GateSpec(
        name="refusals", suite="safety", threshold=0.2, relative=False)]})
    _, ax = plt.subplots()
    _mark_gate_limits(ax, status(), ["safety.refusal_rate"], gated)
    assert [line.get_ydata()[0] for line in ax.lines] == [pytest.approx(0.7)]
    plt.close("all")
    out = tmp_path / "curves.png"
    render_report(status(), plot=str(out), spec=gated)
    import matplotlib.image

    assert matplotlib.image.imread(out).shape[0] > 900  # domain, general and safety panels
