"""One trainer attempt: restore, then step / evaluate / checkpoint until the budget is spent.

Every rank runs this loop on its own shard of the data; the model is a plain module, DDP
replicas or FSDP2 shards (`parallel.py`), and gradients are averaged over ranks either way.
The pieces: `build.py` sets the attempt up, `step.py` is one optimizer step, `recovery.py`
decides what an anomalous step costs, and `checkpoint_manager.py` saves and loads every
stateful part, so a resumed run continues exactly (the LR is a pure function of the step).
A run may resume on another world size: the data positions of all old ranks are re-dealt.

A SIGTERM (Ctrl-C in `cptctl run`, a pod eviction) is agreed on by all ranks at a step
boundary, and the attempt ends with a committed checkpoint at that step.
"""
from __future__ import annotations

import logging
import signal
import time
from datetime import timedelta
from typing import Any

import torch

from cpt_api import store
from cpt_api.evaluation import Placement
from cpt_api.events import CheckpointSaved, Evaluated, Finished, Progress, Started
from cpt_api.exit_codes import EXIT_ANOMALY, EXIT_PEER_STOPPED, EXIT_REFUSED
from cpt_api.manifest import STARTED, checkpoint_name, eval_record_name
from cpt_api.spec import Precision
from cpt_api.trainer_config import TrainerConfig

from . import checkpoint_manager, distributed
from .build import Built, Runtime, setup
from .checkpointer import Saved
from .errors import Refused
from .events import EventLog, earlier_ending, finite
from .goodput import TimeAccount
from .load.ranges import total_read
from .metrics import Metrics

log = logging.getLogger(__name__)


class Attempt:
    def __init__(self, cfg: TrainerConfig):
        self.cfg, self.spec = cfg, cfg.spec
        use_cuda = torch.cuda.is_available()
        self.dist = distributed.setup(use_cuda, timedelta(
            seconds=cfg.spec.training.parallelism.collective_timeout_seconds))
        self.device = self.dist.device
        precision = self.spec.training.precision
        compute = torch.bfloat16 if (precision == Precision.bf16 or (precision == Precision.auto and use_cuda)) \
            else None
        self.progress = checkpoint_manager.Progress()
        self.events = EventLog(cfg.run_dir, enabled=self.dist.is_main)
        self.clock = TimeAccount(cfg.run_dir)
        """Where this attempt's time goes (rank 0's is reported)."""
        self.metrics = Metrics(cfg, serve=self.dist.is_main)
        self.runtime = Runtime(cfg, self.dist, compute, self.events, self.clock, self.metrics, self.progress)
        self.stop_requested = False
        """The ranks agreed to stop (set only by `_agree_stop`, and only ever to True)."""
        self.signalled = False
        """SIGTERM or SIGINT reached this process; only the signal handler writes it, so a signal
        that arrives while the ranks agree is never overwritten, only counted at the next step."""
        self.began = time.monotonic()
        self.last_loss: float | None = None
        self._built: Built | None = None

    @property
    def built(self) -> Built:
        assert self._built is not None, "setup() first"
        return self._built

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def tokens(self) -> int:
        return self.progress.tokens

    @property
    def data(self) -> Any:
        return self.built.data

    @property
    def tokens_per_step(self) -> int:
        return self.built.tokens_per_step

    def setup(self) -> None:
        torch.manual_seed(self.spec.training.seed)
        self._check_earlier_ending()
        self._built = setup(self.runtime)

    def _check_earlier_ending(self) -> None:
        """A trainer restarted in place ends at once as its predecessor did, if that refused its
        config or stopped on an anomaly rule (rank 0's log decides for every rank)."""
        ended = distributed.broadcast_object(earlier_ending(self.cfg.run_dir) if self.dist.is_main else None)
        if isinstance(ended, tuple):
            reason, message = str(ended[0]), str(ended[1])
            log.warning("ending as the trainer before this in-place restart did (%s), before loading anything",
                        reason)
            raise (Refused if reason == "refused" else AnomalyStop)(message)

    # ------------------------------------------------------------------------------- run
    def run(self) -> int:
        self.begin()
        while self.step < self.built.total:
            if self._agree_stop():
                break
            code = self.advance()
            if code is not None:
                return code
        return self.finish()

    def _agree_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested or self.signalled else 0.0], device=self.device)
        agreed = distributed.all_reduce_sum(flag).item() > 0
        self.stop_requested = self.stop_requested or agreed
        return self.stop_requested

    def begin(self) -> None:
        """Set up, announce the attempt, and measure the base once when starting from it."""
        self.setup()
        cfg, b = self.cfg, self.built
        loaded = distributed.gather_objects(total_read())
        self.clock.started(self.step)
        started = self.events.emit(Started, attempt=cfg.attempt, step=self.step, tokens=self.tokens,
                                   restore_from=b.start.uri, world_size=self.dist.world_size,
                                   metrics_url=self.metrics.url, base_sha256=b.base_sha,
                                   loaded_bytes=loaded, setup_seconds=time.monotonic() - self.began,
                                   restart=self.clock.restarts, times=self._times())
        if started is not None:  # where the control plane learns the digest the run records
            store.put_atomic(cfg.checkpoint_uri, STARTED, started.model_dump_json(by_alias=True).encode())
        self.metrics.up(True)
        self.metrics.gates(self.spec, {})
        if b.evaluator is not None and not self._separate and b.start.uri is None and self.step == 0:
            base = self.evaluate(is_base=True)
            self.metrics.gates(self.spec, base)
            self._announce_eval(step=0, tokens=0, metrics=base, is_base=True)

    def advance(self) -> int | None:
        with self.clock.step():
            return self._advance()

    def _advance(self) -> int | None:
        """One optimizer step and everything a step owes: metrics, events, anomaly handling,
        evaluation and checkpoint when due. Returns an exit code when the attempt must end."""
        b, began = self.built, time.perf_counter()
        consumed = b.data.consumed_tokens()
        out = b.train_step(self.step)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        self.progress.step += 1
        self.progress.tokens += b.tokens_per_step
        tps = b.tokens_per_step / seconds
        mfu = b.flops_per_token * tps / (b.peak * self.dist.world_size) if b.peak else None
        skipped = out.verdict is not None
        lr = b.schedule(self.step - 1)
        self.metrics.step(step=self.step, tokens=self.tokens, loss=out.loss, lr=lr, grad_norm=out.grad_norm,
                          tokens_per_s=tps, skipped=skipped, mfu=mfu)
        self.metrics.anomaly_band(b.anomaly)
        if out.verdict is not None:
            code = b.recovery.on_anomaly(out.verdict, consumed, self.step, self.tokens)
            if code is not None:
                return code
        else:
            self.last_loss = out.loss
        b.data.report_losses(out.source_losses)
        roles = dict(zip(b.data.source_names, b.data.roles))
        self.metrics.mixture(roles, b.data.current_weights(), b.data.realised_proportions())
        self.metrics.sources(roles, out.source_losses, out.dropped_shares)
        if self.step % self.spec.training.log_every == 0 or self.step == b.total:
            self.events.emit(Progress, step=self.step, tokens=self.tokens, loss=finite(out.loss), lr=lr,
                             grad_norm=finite(out.grad_norm), tokens_per_s=tps, skipped=skipped,
                             times=self._times())
        self._agree_stop()
        self._boundary(self.last_loss)
        self._report_saves()
        return None

    def finish(self) -> int:
        saved_step = self.built.ckpt.saved_step
        if self.stop_requested:
            if saved_step != self.step:
                self.save({}, self.last_loss)
            self._report_saves(wait=True)
            self.events.emit(Finished, step=self.step, tokens=self.tokens, reason="interrupted", times=self._times(),
                             message="stopped on request after a checkpoint")
            # the signal reached another rank only: its pod went, this one's did not
            return 0 if self.signalled else EXIT_PEER_STOPPED
        if saved_step != self.step:
            self._boundary(self.last_loss)
        self._report_saves(wait=True)
        self.events.emit(Finished, step=self.step, tokens=self.tokens, reason="budget", times=self._times(),
                         message=f"budget reached: {self.step} steps, {self.tokens:,} tokens")
        return 0

    def _times(self) -> Any:
        times = self.clock.report(self.step)
        self.metrics.times(times)
        return times

    # ------------------------------------------------------------------- evals, checkpoints
    @property
    def _separate(self) -> bool:
        """The control plane evaluates each checkpoint in a process of its own (and the base)."""
        ev = self.spec.evaluation
        return ev is not None and ev.placement == Placement.separate

    def _checkpoint_due(self) -> bool:
        # evaluated steps are checkpoints when a separate process evaluates them
        separate = self._separate and self.spec.evaluation.evaluates_at(self.step)  # type: ignore[union-attr]
        return self.step % self.spec.checkpoint.every == 0 or self.step >= self.built.total or separate

    def _eval_due(self) -> bool:
        ev = self.spec.evaluation
        return ev is not None and not self._separate and (ev.evaluates_at(self.step) or self._checkpoint_due())

    def _boundary(self, train_loss: float | None) -> None:
        """Evaluate and/or checkpoint after a step, as the spec says."""
        evals = self.evaluate() if self._eval_due() else None
        if self._checkpoint_due() or self.stop_requested:
            # The evaluation is announced with its checkpoint, once that is committed: a control
            # plane acting on it (a rollback kills this attempt) finds the checkpoint it names.
            self.save(evals or {}, train_loss, evaluation=evals)
        elif evals is not None:
            self._announce_eval(step=self.step, tokens=self.tokens, metrics=evals)

    def evaluate(self, is_base: bool = False) -> dict[str, float]:
        # Every rank evaluates its share of the samples and ends with the same results
        # (`evals/evaluator.py`), whatever the strategy.
        b, results = self.built, {}
        if b.evaluator is not None:
            with self.clock.timed("evaluating"):
                results = b.evaluator.evaluate(b.parallel.model)
                results.update(b.hook.evaluate(b.parallel.model, b.evaluator))
                b.parallel.reshard()
        self.metrics.evals(results, step=self.step, tokens=self.tokens, base=is_base)
        return results

    def save(self, evals: dict[str, float], train_loss: float | None,
             evaluation: dict[str, float] | None = None) -> str:
        recovery = self.built.recovery
        uri = self.built.ckpt.save(evals, train_loss, stable=not recovery.unstable,
                                   skips=recovery.lineage_skips(), evaluation=evaluation)
        recovery.unstable = False
        self._report_saves()
        return uri

    def _report_saves(self, wait: bool = False) -> None:
        """Metrics and events for checkpoints committed in the background (main thread)."""
        for saved in self.built.ckpt.completed(wait=wait):
            self._announce(saved)

    def _announce(self, saved: Saved) -> None:
        self.clock.committed(saved.step)
        self.metrics.checkpoint(saved.step, saved.seconds, stall=saved.stall_seconds)
        self.events.emit(CheckpointSaved, step=saved.step, tokens=saved.tokens,
                         name=checkpoint_name(saved.step), uri=saved.uri, seconds=saved.seconds,
                         retention_error=saved.retention_error)
        if saved.evals is not None:
            self._announce_eval(step=saved.step, tokens=saved.tokens, metrics=saved.evals,
                                checkpoint=checkpoint_name(saved.step))

    def _announce_eval(self, **fields: Any) -> None:
        """An evaluation's event, and its durable record: the control plane reads every
        evaluation from the records, whatever a metrics scrape happened to catch."""
        event = self.events.emit(Evaluated, **fields)
        if event is not None:
            store.put_atomic(self.cfg.checkpoint_uri, eval_record_name(event.step),
                             event.model_dump_json(by_alias=True).encode())

    def close(self) -> None:
        if self._built is not None:
            self._built.ckpt.close()
        self.metrics.up(False)
        self.metrics.close()
        self.events.close()


class AnomalyStop(Exception):
    """An earlier trainer of this attempt stopped on an anomaly rule (onNonFinite: stop): a trainer
    restarted in place stops the same way at once."""


def run_attempt(cfg: TrainerConfig) -> int:
    """Run one attempt; returns the process exit code."""
    attempt = Attempt(cfg)
    stop = lambda *_: setattr(attempt, "signalled", True)  # noqa: E731
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
        # Restart interrupted system calls: C++ transports (gloo) treat EINTR as a failure, and
        # a stop request must end the attempt with a checkpoint, not an error.
        signal.siginterrupt(sig, False)
    try:
        return attempt.run()
    except AnomalyStop as exc:
        attempt.events.emit(Finished, step=attempt.step, tokens=attempt.tokens, reason="anomaly", message=str(exc))
        return EXIT_ANOMALY
    except Refused as exc:
        log.error("refused: %s", exc)
        attempt.events.emit(Finished, step=attempt.step, tokens=attempt.tokens, reason="refused",
                            message=f"refused: {exc}")
        return EXIT_REFUSED
    except Exception as exc:
        attempt.events.emit(Finished, step=attempt.step, tokens=attempt.tokens, reason="error",
                            message=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    finally:
        attempt.close()
        distributed.teardown()


__all__ = ["Attempt", "run_attempt"]
