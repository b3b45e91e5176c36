"""Read the trainer's series from Prometheus (HTTP API) into the reconcile core's terms.

Rank 0 of every attempt exports, each with labels run, namespace, attempt:
  cpt_eval_metric{suite,metric}       latest evaluation value
  cpt_eval_step, cpt_eval_tokens      where that evaluation happened
  cpt_eval_base_metric{suite,metric}  the base model's reference values (set once)
  cpt_step, cpt_tokens_total, cpt_train_loss, cpt_anomalies_total{kind}, cpt_last_checkpoint_step

Gauges only hold the latest evaluation, so earlier ones are recovered from the raw samples of a
range vector (`metric[window]`): every sample of one scrape carries the same timestamp, so each
eval-metric sample is attributed to the `cpt_eval_step` seen at its timestamp.

The trainer sets several gauges one after another, so a scrape can fall in the middle of an
update and pair a step with a value of the evaluation before or after it. Such a torn value is
the value its metric has in a neighbouring evaluation; when an evaluation saw several values of
a metric, values that also belong to a neighbour are dropped, and of the rest the one seen in
most scrapes (then the latest) wins. Whichever order the trainer sets its gauges in, a torn
scrape cannot move a value to the wrong step.
"""
from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from pydantic import ValidationError

from cpt_api.goodput import TIMES_SERIES, TrainerTimes
from ..policy.types import EvalPoint

Series = Mapping[str, Any]
"""One element of a Prometheus `result`: {"metric": labels, "values": [[t, "v"], ...]} for a
matrix, {"metric": labels, "value": [t, "v"]} for a vector."""


class PrometheusError(RuntimeError):
    pass


def selector(run: str, namespace: str, attempt: int | None = None, **extra: str) -> str:
    labels = {"run": run, "namespace": namespace, **extra}
    if attempt is not None:
        labels["attempt"] = str(attempt)
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def by_name(series: Sequence[Series]) -> dict[str, list[Series]]:
    out: dict[str, list[Series]] = defaultdict(list)
    for s in series:
        out[s["metric"].get("__name__", "")].append(s)
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _attempt(series: Series) -> int | None:
    try:
        return int(series["metric"].get("attempt", ""))
    except ValueError:
        return None


def _samples(series: Series) -> list[tuple[float, float]]:
    return [(float(t), float(v)) for t, v in series.get("values", [])]


def _timeline(matrix: Sequence[Series]) -> dict[int, tuple[list[float], list[float]]]:
    """attempt -> (sorted timestamps, values) of a per-attempt gauge such as cpt_eval_step."""
    out: dict[int, list[tuple[float, float]]] = {}
    for series in matrix:
        attempt = _attempt(series)
        if attempt is not None:
            out.setdefault(attempt, []).extend(_samples(series))
    return {a: ([t for t, _ in sorted(s)], [v for _, v in sorted(s)]) for a, s in out.items()}


def _at(timeline: tuple[list[float], list[float]], ts: float) -> float | None:
    """The value of a gauge at `ts`: its last sample at or before it."""
    times, values = timeline
    index = bisect_right(times, ts) - 1
    return values[index] if index >= 0 else None


def _settle(seen: list[tuple[float, float]], neighbours: set[float]) -> float:
    """One value from the (timestamp, value) samples of a metric within one evaluation."""
    values = {v for _, v in seen}
    if len(values) > 1:
        own = [(t, v) for t, v in seen if v not in neighbours]
        seen = own or seen
    counts: dict[float, tuple[int, float]] = {}
    for t, v in seen:
        n, last = counts.get(v, (0, t))
        counts[v] = (n + 1, max(last, t))
    return max(counts.items(), key=lambda item: item[1])[0]


def eval_points(metrics: Sequence[Series], steps: Sequence[Series],
                tokens: Sequence[Series] = ()) -> list[EvalPoint]:
    """Distinct evaluations (one point per attempt and eval step) from range-vector samples."""
    step_at, tokens_at = _timeline(steps), _timeline(tokens)
    samples: dict[tuple[int, int], dict[str, list[tuple[float, float]]]] = {}
    token_of: dict[tuple[int, int], int] = {}
    for series in metrics:
        attempt, labels = _attempt(series), series["metric"]
        if attempt is None or attempt not in step_at or "suite" not in labels or "metric" not in labels:
            continue
        key = f"{labels['suite']}.{labels['metric']}"
        for ts, value in _samples(series):
            step = _at(step_at[attempt], ts)
            if step is None or not math.isfinite(step):
                continue
            point = (attempt, int(step))
            samples.setdefault(point, {}).setdefault(key, []).append((ts, value))
            if attempt in tokens_at:
                count = _at(tokens_at[attempt], ts)
                if count is not None and math.isfinite(count):
                    token_of[point] = int(count)
    order = sorted(samples)
    points = []
    for i, (attempt, step) in enumerate(order):
        adjacent = [order[j] for j in (i - 1, i + 1) if 0 <= j < len(order) and order[j][0] == attempt]
        metrics_out = {}
        for key, seen in sorted(samples[(attempt, step)].items()):
            neighbours = {v for n in adjacent for _, v in samples[n].get(key, [])}
            metrics_out[key] = _settle(seen, neighbours)
        points.append(EvalPoint(attempt=attempt, step=step, tokens=token_of.get((attempt, step), 0),
                                metrics=metrics_out))
    return points


def labelled_values(vector: Sequence[Series], *labels: str) -> dict[str, float]:
    """Instant-vector samples keyed by the given labels joined with '.', e.g. suite.metric."""
    out: dict[str, float] = {}
    for series in vector:
        names = series["metric"]
        if all(label in names for label in labels):
            out[".".join(names[label] for label in labels)] = float(series["value"][1])
    return out


def scalar(vector: Sequence[Series]) -> float | None:
    values = [float(s["value"][1]) for s in vector]
    return max(values) if values else None


@dataclass(frozen=True, kw_only=True)
class TrainerSeries:
    """What Prometheus knows of one run."""

    points: list[EvalPoint] = field(default_factory=list)
    base: dict[str, float] = field(default_factory=dict)
    anomalies: dict[str, int] = field(default_factory=dict)
    step: int = 0
    tokens: int = 0
    checkpoint_step: int | None = None
    """The step of the current attempt's newest committed checkpoint (cpt_last_checkpoint_step)."""
    times: TrainerTimes | None = None
    """The current attempt's trainer's account of its time (`cpt_trainer_times`)."""


EVAL_SERIES = ("cpt_eval_metric", "cpt_eval_step", "cpt_eval_tokens")
NOW_SERIES = ("cpt_step", "cpt_tokens_total", "cpt_anomalies_total", "cpt_last_checkpoint_step", TIMES_SERIES)


def _int(value: float | None) -> int | None:
    return int(value) if value is not None and math.isfinite(value) else None


def trainer_series(evals: Sequence[Series], base: Sequence[Series], now: Sequence[Series],
                   attempt: int) -> TrainerSeries:
    """One run's series from the three query results (evaluations of every attempt, the base's
    values, the progress gauges, which count only for `attempt`)."""
    named = by_name(evals)
    points = eval_points(named["cpt_eval_metric"], named["cpt_eval_step"], named["cpt_eval_tokens"])
    current = by_name([s for s in now if _attempt(s) == attempt])
    anomalies = {k: int(v) for k, v in labelled_values(current["cpt_anomalies_total"], "kind").items()
                 if math.isfinite(v)}
    return TrainerSeries(points=points, base=labelled_values(base, "suite", "metric"), anomalies=anomalies,
                         step=_int(scalar(current["cpt_step"])) or 0,
                         tokens=_int(scalar(current["cpt_tokens_total"])) or 0,
                         checkpoint_step=_int(scalar(current["cpt_last_checkpoint_step"])),
                         times=_times(labelled_values(current[TIMES_SERIES], "part")))


def _times(parts: Mapping[str, float]) -> TrainerTimes | None:
    """The trainer's account from its gauge's series; None before it reported, or when a scrape
    caught only part of it."""
    if not {"began", "reported"} <= parts.keys() or not all(math.isfinite(v) for v in parts.values()):
        return None
    try:
        return TrainerTimes.model_validate(
            {k: (int(v) if k in ("first_step", "step", "restarts", "saves") else v) for k, v in parts.items()})
    except ValidationError:
        return None


@dataclass(frozen=True)
class NamespaceSeries:
    """The three query results for every run of a namespace, read at once, by run."""

    window_s: int
    evals: Mapping[str, list[Series]]
    base: Mapping[str, list[Series]]
    now: Mapping[str, list[Series]]

    def of(self, run: str, attempt: int) -> TrainerSeries:
        return trainer_series(self.evals.get(run, []), self.base.get(run, []), self.now.get(run, []), attempt)


def by_run(series: Sequence[Series]) -> dict[str, list[Series]]:
    out: dict[str, list[Series]] = defaultdict(list)
    for s in series:
        out[s["metric"].get("run", "")].append(s)
    return dict(out)


class PrometheusReader:
    def __init__(self, url: str, timeout_s: float = 10.0):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    def query(self, promql: str) -> list[Series]:
        query = urllib.parse.urlencode({"query": promql})
        request = urllib.request.Request(f"{self.url}/api/v1/query", data=query.encode(),
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise PrometheusError(f"{promql}: HTTP {exc.code} {detail}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise PrometheusError(f"{promql}: {exc}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{promql}: {body.get('error', body)}")
        return list(body["data"]["result"])

    def _three(self, labels: Mapping[str, str], window_s: int) -> tuple[list[Series], list[Series], list[Series]]:
        # one query per shape rather than per series: a pass runs for every run every few seconds
        window = f"[{max(int(window_s), 1)}s]"
        matchers = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        evals = self.query(f'{{__name__=~"{"|".join(EVAL_SERIES)}",{matchers}}}{window}')
        base = self.query(f"last_over_time(cpt_eval_base_metric{{{matchers}}}{window})")
        now = self.query(f'{{__name__=~"{"|".join(NOW_SERIES)}",{matchers}}}')
        return evals, base, now

    def read(self, run: str, namespace: str, attempt: int, window_s: int) -> TrainerSeries:
        """Evaluations of every attempt within the window, and the current attempt's progress."""
        evals, base, now = self._three({"run": run, "namespace": namespace}, window_s)
        return trainer_series(evals, base, now, attempt)

    def read_namespace(self, namespace: str, window_s: int) -> NamespaceSeries:
        """The same for every run of a namespace, in three queries for all of them."""
        evals, base, now = self._three({"namespace": namespace}, window_s)
        return NamespaceSeries(window_s, by_run(evals), by_run(base), by_run(now))
