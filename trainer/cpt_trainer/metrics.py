"""The trainer's Prometheus exporter: one small interface the loop calls, served by rank 0.

Every series carries `run`, `namespace` and `attempt` labels so the control plane can tell
attempts of one run apart. Other ranks get an exporter with no server (calls are cheap no-ops on
a private registry), so the loop needs no rank checks.
"""
from __future__ import annotations

import math
import os
import socket
import time
from typing import TYPE_CHECKING, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from cpt_api.goodput import TIMES_SERIES, TrainerTimes
from cpt_api.spec import CptRunSpec
from cpt_api.trainer_config import TrainerConfig
from cpt_api.metrics import gate_limit

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .anomaly import AnomalyDetector

BASE_LABELS = ("run", "namespace", "attempt")
PORT_FILE = "metrics-port"


class Metrics:
    def __init__(self, cfg: TrainerConfig, serve: bool):
        self.registry = CollectorRegistry()
        self._labels = {"run": cfg.run, "namespace": cfg.namespace, "attempt": str(cfg.attempt)}
        self._define()
        self._server: WSGIServer | None = None
        self.url: str | None = None
        if serve:
            self._serve(cfg)

    def _gauge(self, name: str, doc: str, *extra: str) -> Gauge:
        return Gauge(name, doc, BASE_LABELS + extra, registry=self.registry)

    def _counter(self, name: str, doc: str, *extra: str) -> Counter:
        return Counter(name, doc, BASE_LABELS + extra, registry=self.registry)

    def _define(self) -> None:
        g, c = self._gauge, self._counter
        self.loss = g("cpt_train_loss", "Mean next-token loss of the last step")
        self.lr = g("cpt_learning_rate", "Learning rate of the last step")
        self.grad_norm = g("cpt_grad_norm", "Global gradient norm before clipping")
        self.tps = g("cpt_tokens_per_second", "Training tokens per second (all ranks)")
        self.tokens = g("cpt_tokens_total", "Training tokens consumed in this run")
        self.step_g = g("cpt_step", "Optimizer steps done")
        self.skipped = c("cpt_skipped_steps", "Steps whose update was skipped as anomalous")
        self.anomalies = c("cpt_anomalies", "Anomalies by kind", "kind")
        self.saves = c("cpt_checkpoint_saves", "Checkpoints written")
        self.ckpt_seconds = g("cpt_checkpoint_seconds", "Duration of the last checkpoint save, "
                              "start to committed manifest")
        self.ckpt_stall = g("cpt_checkpoint_stall_seconds", "Training time the last checkpoint save "
                            "blocked (host copy; the rest is written in the background)")
        self.ckpt_step = g("cpt_last_checkpoint_step", "Step of the last checkpoint")
        self.mix_weight = g("cpt_mixture_weight", "Target sampling weight", "source", "role")
        self.mix_real = g("cpt_mixture_realised", "Realised token share", "source", "role")
        self.source_loss = g("cpt_source_loss", "Mean next-token loss on a source's tokens in the last step",
                             "source", "role")
        self.source_dropped = g("cpt_source_dropped_share", "Share of a source's documents read so far "
                                "(all ranks) that curation dropped", "source", "role")
        self.eval_metric = g("cpt_eval_metric", "Evaluation result", "suite", "metric")
        self.mfu = g("cpt_mfu", "Model FLOPs utilisation against the device's bf16 peak")
        self.eval_base = g("cpt_eval_base_metric", "The base model's value of an eval metric",
                           "suite", "metric")
        self.eval_step = g("cpt_eval_step", "Optimizer step of the last evaluation")
        self.eval_tokens = g("cpt_eval_tokens", "Training tokens at the last evaluation")
        self.gate_threshold = g("cpt_gate_threshold",
                                "Worst value a gate tolerates (absolute, from the base baseline)",
                                "gate", "suite", "metric")
        self.grad_mean = g("cpt_grad_norm_mean", "Mean grad norm over the anomaly window")
        self.grad_std = g("cpt_grad_norm_std", "Std of the grad norm over the anomaly window")
        self.anomaly_k = g("cpt_anomaly_k", "k of the grad-norm anomaly rule (mean + k*std)")
        self.ckpt_time = g("cpt_last_checkpoint_timestamp_seconds", "Unix time of the last checkpoint")
        self.times_g = g(TIMES_SERIES, "The trainer's account of its time (api.goodput.TrainerTimes): "
                         "seconds by part, began/reported Unix times, first_step/step, restarts", "part")
        self.up_g = g("cpt_trainer_up", "1 while the training loop runs")
        self.new_token_loss = g("cpt_new_token_loss", "Mean loss where a token added by tokenizer "
                                "extension is the target, since the last checkpoint", "token")
        self.new_token_seen = c("cpt_new_token_seen", "Times a token added by tokenizer extension "
                                "was a training target", "token")

    def _serve(self, cfg: TrainerConfig) -> None:
        self._server, _ = start_http_server(cfg.metrics_port, registry=self.registry)
        port = self._server.server_port
        self.url = f"http://{socket.gethostname()}:{port}/metrics"
        if cfg.metrics_port == 0:
            # Written to a temporary name and renamed: a reader never sees a half-written port.
            path = os.path.join(cfg.run_dir, PORT_FILE)
            os.makedirs(cfg.run_dir, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                f.write(f"{port}\n")
            os.replace(path + ".tmp", path)

    def step(self, *, step: int, tokens: int, loss: float, lr: float, grad_norm: float,
             tokens_per_s: float, skipped: bool, mfu: float | None = None) -> None:
        labels = self._labels
        self.step_g.labels(**labels).set(step)
        self.tokens.labels(**labels).set(tokens)
        self.loss.labels(**labels).set(loss)
        self.lr.labels(**labels).set(lr)
        self.grad_norm.labels(**labels).set(grad_norm)
        self.tps.labels(**labels).set(tokens_per_s)
        if skipped:
            self.skipped.labels(**labels).inc()
        if mfu is not None:
            self.mfu.labels(**labels).set(mfu)

    def anomaly(self, kind: str) -> None:
        self.anomalies.labels(kind=kind, **self._labels).inc()

    def checkpoint(self, step: int, seconds: float, stall: float) -> None:
        self.saves.labels(**self._labels).inc()
        self.ckpt_seconds.labels(**self._labels).set(seconds)
        self.ckpt_stall.labels(**self._labels).set(stall)
        self.ckpt_step.labels(**self._labels).set(step)
        self.ckpt_time.labels(**self._labels).set(time.time())

    def mixture(self, roles: Mapping[str, str], weights: Mapping[str, float],
                realised: Mapping[str, float]) -> None:
        for source, role in roles.items():
            if source in weights:
                self.mix_weight.labels(source=source, role=role, **self._labels).set(weights[source])
            if source in realised:
                self.mix_real.labels(source=source, role=role, **self._labels).set(realised[source])

    def sources(self, roles: Mapping[str, str], losses: Mapping[str, float],
                dropped: Mapping[str, float]) -> None:
        """Per source: the last step's loss (a source far above the others is data the model
        cannot learn, or junk) and curation's dropped share."""
        for source, role in roles.items():
            if source in losses and math.isfinite(losses[source]):
                self.source_loss.labels(source=source, role=role, **self._labels).set(losses[source])
            if source in dropped:
                self.source_dropped.labels(source=source, role=role, **self._labels).set(dropped[source])

    def evals(self, results: Mapping[str, float], *, step: int = 0, tokens: int = 0,
              base: bool = False) -> None:
        """An evaluation's results; the base model's go to their own series (the reference
        every regression is measured against) as well as to the current values. The step goes
        first, so a scrape between the writes never pairs new values with an old step."""
        self.eval_step.labels(**self._labels).set(step)
        self.eval_tokens.labels(**self._labels).set(tokens)
        for key, value in results.items():
            suite, _, metric = key.partition(".")
            self.eval_metric.labels(suite=suite, metric=metric, **self._labels).set(value)
            if base:
                self.eval_base.labels(suite=suite, metric=metric, **self._labels).set(value)

    def gates(self, spec: CptRunSpec, base: Mapping[str, float]) -> None:
        """Each base-baseline gate's limit as an absolute value, so dashboards can draw it."""
        suites = spec.suites_by_name()
        for gate in spec.gates:
            suite = suites.get(gate.suite)
            limit = gate_limit(gate, suite, base) if suite is not None else None
            if suite is None or limit is None:
                continue
            self.gate_threshold.labels(gate=gate.name, suite=suite.name, metric=suite.metric.value,
                                       **self._labels).set(limit)

    def anomaly_band(self, detector: "AnomalyDetector") -> None:
        mean, std = detector.band()
        if mean is not None:
            self.grad_mean.labels(**self._labels).set(mean)
            self.grad_std.labels(**self._labels).set(std)
        self.anomaly_k.labels(**self._labels).set(detector.spec.k)

    def new_token(self, token: str, *, loss: float, seen: int) -> None:
        """An added token's interval loss and the targets of it just trained on (the label is
        the term, readable, rather than its byte-level vocabulary entry)."""
        self.new_token_loss.labels(token=token, **self._labels).set(loss)
        self.new_token_seen.labels(token=token, **self._labels).inc(seen)

    def times(self, times: TrainerTimes) -> None:
        for part, value in times.model_dump().items():
            self.times_g.labels(part=part, **self._labels).set(value)

    def up(self, running: bool) -> None:
        self.up_g.labels(**self._labels).set(1 if running else 0)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
