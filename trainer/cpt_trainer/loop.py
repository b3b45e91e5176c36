"""One trainer attempt: restore, then step / evaluate / checkpoint until the budget is spent.

Every rank runs this loop on its own shard of the data; the model is a plain module, DDP
replicas or FSDP2 shards (`parallel.py`), and gradients are averaged over ranks either way. The
loss is token-weighted over the whole global batch (all micro-batches of all ranks), so gradient
accumulation and the world size change the throughput, never the objective.

What makes a resumed run continue exactly: the checkpoint holds weights, AdamW state, the step
and token counters, the anomaly window, every rank's data position and RNG state; the LR is a
pure function of the step. Weights and AdamW state are sharded (`checkpointer.py`), so a run
may resume on another world size: the data positions of all old ranks are re-dealt to the new
ones. A SIGTERM (Ctrl-C in `cptctl run`, a pod eviction) is agreed on by all ranks at a step
boundary, and the attempt ends with a committed checkpoint at that step.

Anomalies (`anomaly.py` flags steps, which are skipped): after `maxConsecutive` in a row the
attempt restores the weights and optimizer of its last stable checkpoint but keeps its data
position, so the data of the anomalous steps is skipped, and records that stretch of the
blamed source as a skip window (`api.skips`: event, and every later checkpoint's lineage, so a
rollback to an earlier checkpoint skips it too). Anomalous steps blamed on a source that
continue a known window (begun inside it or at its end, its own or one the control plane said
to skip) widen it without another restore, however few they are: the weights are still the
stable ones, and one bad stretch of data is at most one restore, however long.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import time
from collections import Counter
from datetime import timedelta
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from cpt_operator import store
from cpt_operator.api.evaluation import Placement
from cpt_operator.api.events import Anomaly, CheckpointSaved, Evaluated, Finished, Progress, Started
from cpt_operator.api.exit_codes import EXIT_ANOMALY, EXIT_PEER_STOPPED, EXIT_REFUSED
from cpt_operator.api.manifest import (MODEL_DIR, OPTIMIZER_DIR, SKIPS, STARTED, TRAIN_STATE, Lineage, checkpoint_name,
                                       data_file, eval_record_name, rng_file)
from cpt_operator.api.skips import SKIP_LIST, DataSkip, merge_skips
from cpt_operator.api.spec import (Boundary, ModelFormat, NonFiniteAction, Precision, RestoreMode,
                                   SourceRole)
from cpt_operator.api.ownership import RunRecord
from cpt_operator.api.trainer_config import TrainerConfig

from . import checkpoint, code_version, distributed, extension
from .anomaly import AnomalyDetector, Verdict
from .checkpointer import Checkpointer, Saved, Snapshot, set_rng_state
from .data import Batch, DataPipeline, check_document_isolation, tokenizer_hash
from .data.curation import dropped_shares, starvation, starved_sources
from .errors import Refused
from .events import EventLog, earlier_ending
from .goodput import TimeAccount
from .metrics import Metrics
from .load.ranges import total_read
from .load.stores import WeightStore
from .load.weights import Weights, build, fill, refill
from .model import attention_backend, check_digest, check_recorded_digest, load_tokenizer
from .parallel import Parallel, parallelize
from .perf import flops_per_token, peak_flops
from .refkl import replay_kl
from .schedule import build_schedule

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class StartPoint:
    """Where this attempt's weights (and maybe state) come from."""

    uri: str | None
    """Checkpoint URI, or None for the base model."""
    mode: RestoreMode
    weights: Weights


@dataclass
class StepOutcome:
    loss: float
    grad_norm: float
    tokens: int
    verdict: Verdict | None
    source_losses: dict[str, float] = field(default_factory=dict)
    dropped_shares: dict[str, float] = field(default_factory=dict)
    """Per source, the share of the documents read so far (all ranks) that curation dropped."""


class Attempt:
    def __init__(self, cfg: TrainerConfig):
        self.cfg, self.spec = cfg, cfg.spec
        use_cuda = torch.cuda.is_available()
        self.dist = distributed.setup(use_cuda, timedelta(
            seconds=cfg.spec.training.parallelism.collective_timeout_seconds))
        self.device = self.dist.device
        precision = self.spec.training.precision
        self.autocast_dtype = torch.bfloat16 if (
            precision == Precision.bf16 or (precision == Precision.auto and use_cuda)) else None
        self.events = EventLog(cfg.run_dir, enabled=self.dist.is_main)
        self.clock = TimeAccount(cfg.run_dir)
        """Where this attempt's time goes (rank 0's is reported)."""
        self.metrics = Metrics(cfg, serve=self.dist.is_main)
        self.stop_requested = False
        """The ranks agreed to stop (set only by `_agree_stop`, and only ever to True)."""
        self.signalled = False
        """SIGTERM or SIGINT reached this process; only the signal handler writes it, so a signal
        that arrives while the ranks agree is never overwritten, only counted at the next step."""
        self.began = time.monotonic()
        self.step = 0
        self.tokens = 0
        self.unstable = False
        self.last_saved_step: int | None = None
        self.last_checkpoint: str | None = None
        self.last_loss: float | None = None
        self.skips: list[DataSkip] = []
        """Data windows this attempt blamed for its restores (api.skips)."""
        self._streak_from: dict[str, int] = {}
        """Per source, tokens consumed before the current run of anomalous steps began."""
        self._streak_step = 0
        self._blamed: list[str] = []
        self.grown: list[str] = []
        """Tensors the run's hook made larger than the base's (refilled with the base)."""

    # ------------------------------------------------------------------------------ setup
    def _start_point(self) -> StartPoint:
        base = self.spec.base_model
        mode = self.cfg.restore_mode or base.restore_mode
        uri = self.cfg.restore_from
        if uri is None and base.format == ModelFormat.checkpoint:
            uri = base.uri
        own = self._own_newest()
        if own is not None:  # restarted in place: continue where this attempt last saved
            uri, mode = own, RestoreMode.full_state
        if uri is None:
            return StartPoint(None, RestoreMode.weights_only, self.weights.base_weights())
        source = self.weights.open(uri, (MODEL_DIR, OPTIMIZER_DIR) if mode == RestoreMode.full_state else (MODEL_DIR,))
        self.restored_manifest = source.manifest
        return StartPoint(uri, mode, Weights.of_checkpoint(source))

    def _check_earlier_ending(self) -> None:
        """A trainer restarted in place ends at once as its predecessor did, if that refused its
        config or stopped on an anomaly rule (rank 0's log decides for every rank)."""
        ended = distributed.broadcast_object(earlier_ending(self.cfg.run_dir) if self.dist.is_main else None)
        if isinstance(ended, tuple):
            reason, message = str(ended[0]), str(ended[1])
            log.warning("ending as the trainer before this in-place restart did (%s), before loading anything",
                        reason)
            raise (Refused if reason == "refused" else AnomalyStop)(message)

    def _own_newest(self) -> str | None:
        """The attempt's newest committed checkpoint: there is one only when torchrun restarted
        this trainer in place (an attempt's folder is never reused). Rank 0 looks, every rank
        follows, whatever each node's restart count says."""
        found = distributed.broadcast_object(
            checkpoint.latest_valid(self.cfg.checkpoint_uri, deep=False) if self.dist.is_main else None)
        return checkpoint.join(self.cfg.checkpoint_uri, found[0]) if found else None  # type: ignore[index]

    def _check_owner(self) -> None:
        """Before anything is written, pruned or restored: the checkpoint root (and the restore
        point's) must belong to this run, or another run's checkpoints would be overwritten."""
        cfg, base = self.cfg, self.spec.base_model
        run = RunRecord(uid=cfg.run_uid, name=cfg.run, namespace=cfg.namespace) if cfg.run_uid else None
        checkpoint_base = base.uri if base.format == ModelFormat.checkpoint else None
        problem = distributed.broadcast_object(
            checkpoint.ownership_problem(cfg.checkpoint_root, run, cfg.restore_from, checkpoint_base,
                                         base.import_checkpoint)
            if self.dist.is_main else None)
        if problem:
            raise Refused(str(problem))

    def setup(self) -> None:
        spec, cfg = self.spec, self.cfg
        torch.manual_seed(spec.training.seed)
        self._check_earlier_ending()
        self._check_owner()
        self.checkpointer = Checkpointer(cfg.checkpoint_uri, self.dist, keep=spec.checkpoint.keep,
                                         async_save=spec.checkpoint.asynchronous,
                                         root=cfg.checkpoint_root, restore_from=cfg.restore_from)
        self.attention = attention_backend(spec.training.attention, self.device)
        self.weights = WeightStore(spec.base_model, self.dist)
        self.base_path = self.weights.base_path()
        self.base_sha = self.weights.base_digest()
        self.start = self._start_point()
        check_digest(spec.base_model, self.base_sha)
        check_recorded_digest(spec.base_model.uri, cfg.base_sha256, self.base_sha)
        self.tokenizer = load_tokenizer(spec.base_model, spec.tokenizer, self.base_path)
        _check_tokenizer_version(spec.tokenizer.version, tokenizer_hash(self.tokenizer),
                                 spec.tokenizer.uri or spec.base_model.uri)
        self.hook = extension.build_hook(cfg, self.tokenizer, rank=self.dist.rank,
                                         is_main=self.dist.is_main)
        self.tokenizer = self.hook.tokenizer(self.tokenizer)
        self.tok_hash = tokenizer_hash(self.tokenizer)
        if self.start.uri is not None:
            self._check_lineage()
        self.parallel = self._build_model()
        self.model: PreTrainedModel = self.parallel.model  # type: ignore[assignment]
        self.hook.on_start(cfg.checkpoint_uri)
        self.model.train()
        # Flash-attention honours per-document positions only in a single packed row.
        self.flatten = self.attention == "flash_attention_2"
        if spec.packing.boundary == Boundary.document_mask:
            # Milliseconds, and it turns a silent cross-document leak into a clear error.
            # Parameters stay fp32 under FSDP mixed precision while the maths runs in bf16: the
            # tolerance follows the compute dtype, not the parameters'.
            check_document_isolation(self.model, flatten=self.flatten,
                                     atol=5e-2 if self.autocast_dtype is not None else None)
            self.parallel.reshard()
        # in bf16 on GPU, sharded like the trained model
        self.reference = self.weights.reference(
            self.hook, self.parallel, self.checkpointer, dtype=self.autocast_dtype or torch.float32,
            attention=self.attention) if spec.needs_reference else None
        self.evaluator = self._evaluator()
        eval_texts = self.evaluator.texts() if self.evaluator is not None else ()
        try:
            self.data = DataPipeline(cfg, self.tokenizer, self.dist.rank, self.dist.world_size,
                                     eval_texts=eval_texts, report_dir=cfg.run_dir, share=distributed.from_rank0)
        except (ValueError, FileNotFoundError) as exc:
            # Sources that do not exist or curate to nothing: fixing the spec is the only cure.
            raise Refused(f"data: {exc}") from exc
        self.data = self.hook.wrap_data(self.data)
        self.replay_ids = [i for i, role in enumerate(self.data.roles) if role == SourceRole.replay.value]
        self.optimizer = self._optimizer()
        self.anomaly = AnomalyDetector(spec.gradient.anomaly)
        self.tokens_per_step = spec.tokens_per_step(self.dist.world_size)
        self.total = spec.total_steps(self.dist.world_size)
        self.schedule = build_schedule(spec, self.total, cfg.overrides.lr_scale, cfg.overrides.rewarm_from)
        if self.start.uri is not None and self.start.mode == RestoreMode.full_state:
            self._load_full_state()
        self.config_hash = hashlib.sha256(cfg.spec.model_dump_json(by_alias=True).encode()
                                          + cfg.overrides.model_dump_json().encode()).hexdigest()
        self.flops_token = flops_per_token(self.model, spec.packing.seq_len)
        self.peak = peak_flops(self.device) if self.device.type == "cuda" else None

    def _build_model(self) -> Parallel:
        """The model, wrapped for the run's strategy, with the start point's weights: built on
        the meta device, sharded, then each rank reads only its own slices (`load/weights.py`)."""
        weights = self.start.weights
        loading = build(weights, self.hook, attention=self.attention)
        parallel = parallelize(loading.model, self.spec.training.parallelism, self.dist,
                               procs_per_node=self.spec.resources.procs_per_node,
                               compute_dtype=self.autocast_dtype)
        fill(loading, weights, self.hook, self.checkpointer)
        self.grown = loading.grown
        log.info("model on %s x %d: %s, attention %s, compute %s, weights from %s%s", self.device.type,
                 self.dist.world_size, parallel.strategy.value if parallel.strategy else "single",
                 self.attention, "bf16" if self.autocast_dtype is not None else "fp32",
                 weights.describe(), self._read_note(weights))
        return parallel

    @staticmethod
    def _read_note(weights: Weights) -> str:
        read = weights.source.bytes_read if weights.source is not None else 0
        return f" ({read / 2**20:.1f} MiB read from the store by this rank)" if read else ""

    def _check_lineage(self) -> None:
        """Refuse a checkpoint that another tokenizer, base or data stream produced."""
        assert self.restored_manifest is not None  # _start_point set it: start.uri is not None here
        lineage = self.restored_manifest.lineage
        extends = self.hook.accepts(lineage.tokenizer_hash, self.start.mode)
        if lineage.tokenizer_hash != self.tok_hash and not extends:
            source = self.hook.describe(
                self.spec.tokenizer.uri or f"the base model {self.spec.base_model.uri}")
            raise Refused(f"tokenizer mismatch: checkpoint {self.start.uri} was trained with tokenizer "
                          f"{lineage.tokenizer_hash} (its manifest), but this run's tokenizer from "
                          f"{source} has hash {self.tok_hash}")
        if lineage.base_sha256 and lineage.base_sha256 != self.base_sha \
                and self.spec.base_model.format != ModelFormat.checkpoint:
            raise Refused(f"checkpoint {self.start.uri} descends from base {lineage.base_uri} "
                          f"(sha256 {lineage.base_sha256}), this run's base {self.spec.base_model.uri} "
                          f"has sha256 {self.base_sha}")

    def _evaluator(self) -> Any:
        if self.spec.evaluation is None:
            return None
        from .evals import Evaluator

        return Evaluator(self.spec.evaluation, self.tokenizer, device=self.device,
                         seq_len=self.spec.packing.seq_len, autocast_dtype=self.autocast_dtype,
                         reference=self.reference)

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW with no weight decay on biases and norm gains (1-D tensors), as usual."""
        opt = self.spec.optimizer
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": opt.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=opt.lr, betas=cast(tuple[float, float], tuple(opt.betas)),
                                 eps=opt.eps)

    # --------------------------------------------------------------------------- restore
    def _load_full_state(self) -> None:
        """Optimizer, counters, anomaly window, data positions and RNG of a fullState start.
        Another world size is fine: shards are re-cut by DCP, data positions re-dealt."""
        uri, source = self.start.uri, self.start.weights.source
        assert source is not None
        directory = source.directory
        state = _read_json(directory, TRAIN_STATE)
        saved_world = int(state["worldSize"])
        data_states = [_read_json(directory, data_file(r)) for r in range(saved_world)]
        if data_states[0].get("data_version") != self.data.data_version:
            raise Refused(f"data version mismatch: checkpoint {uri} was trained on data version "
                          f"{data_states[0].get('data_version')}, the data sources of this run now "
                          f"give {self.data.data_version}. Use restoreMode weightsOnly to start a "
                          "new data stream from these weights.")
        self.data.load_state_dicts(data_states)
        self.checkpointer.load_optimizer(self.model, self.optimizer, source)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.anomaly.load_state_dict(state["anomaly"])
        if saved_world == self.dist.world_size:
            set_rng_state(_read_json(directory, rng_file(self.dist.rank)))
        else:  # no rank's stream continues: derive a fresh, reproducible one
            torch.manual_seed(self.spec.training.seed + 1_000_003 * self.step + self.dist.rank)
        self.last_saved_step = self.step
        self.last_checkpoint = uri

    def _restore_stable(self) -> str:
        """Anomaly recovery: weights and optimizer of the last stable checkpoint of this attempt
        (or of its start point); the data stream moves on, past the slice that hurt."""
        self.checkpointer.wait()
        # sizes only: the restore verifies every block it reads
        found = distributed.broadcast_object(
            checkpoint.latest_valid(self.cfg.checkpoint_uri, stable_only=True, deep=False)
            if self.dist.is_main else None)
        own = checkpoint.join(self.cfg.checkpoint_uri, found[0]) if found else None  # type: ignore[index]
        uri = own or self.start.uri
        # Optimizer moments belong to the weights they were taken with: keep them only when the
        # source carries them for this run (our own checkpoint, or a fullState start).
        with_state = uri is not None and (own is not None or self.start.mode == RestoreMode.full_state)
        if uri is None:
            refill(self.model, self.start.weights, self.hook, self.checkpointer, self.grown)
        else:
            source = self.weights.open(uri, (MODEL_DIR, OPTIMIZER_DIR) if with_state else (MODEL_DIR,))
            self.checkpointer.load_model(self.model, source)
            if with_state:
                self.checkpointer.load_optimizer(self.model, self.optimizer, source)
        if not with_state:
            self.optimizer.state.clear()
        self.optimizer.zero_grad(set_to_none=True)
        return uri or f"base {self.spec.base_model.uri}"

    # ------------------------------------------------------------------------------ step
    def _forward_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token NLL [B, T-1], its mask, and the KL-to-base term (summed)."""
        net = self.parallel.forward
        batch = batch.to(self.device)
        labels = batch.labels[:, 1:]
        inputs = batch.model_inputs(flatten=self.flatten)
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype) \
            if self.autocast_dtype else contextlib.nullcontext()
        with autocast:
            logits = net(**inputs).logits.view(*batch.input_ids.shape, -1)[:, :-1]
        logits = logits.float()
        mask = labels != IGNORE
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.clamp(min=0).reshape(-1),
                              reduction="none").view_as(labels) * mask
        kl = torch.zeros((), device=self.device)
        beta = self.spec.regularization.ref_kl.beta
        if beta > 0 and self.reference is not None and self.replay_ids:
            replay = torch.isin(batch.source_ids[:, 1:],
                                torch.tensor(self.replay_ids, device=self.device)) & mask
            # Entered on every micro-batch when the reference is sharded (a collective).
            term = replay_kl(self.reference, batch, logits, replay, flatten=self.flatten,
                             collective=self.parallel.sharded, autocast=autocast)
            if term is not None:
                kl = beta * term
        return nll, mask, kl

    def train_step(self) -> StepOutcome:
        t = self.spec.training
        micro = [self.data.next_batch(t.micro_batch_size) for _ in range(t.grad_accumulation)]
        counts = torch.tensor([float(sum(b.num_tokens for b in micro))], device=self.device)
        n_global = max(1.0, distributed.all_reduce_sum(counts).item())
        # DDP averages gradients over ranks; scaling by world size makes that a global token mean.
        scale = self.dist.world_size / n_global
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        names = self.data.source_names
        # Per source: summed NLL and counted tokens (their sums are the step's loss), and the
        # documents curation has read and kept so far on this rank; one all-reduce carries all.
        read_here, kept_here = self.data.documents()
        totals = torch.zeros(4, len(names), dtype=torch.float64, device=self.device)
        totals[2] = torch.tensor([read_here.get(n, 0) for n in names], dtype=torch.float64)
        totals[3] = torch.tensor([kept_here.get(n, 0) for n in names], dtype=torch.float64)
        for i, batch in enumerate(micro):
            with self.parallel.accumulating(last=i == len(micro) - 1):
                nll, mask, kl = self._forward_losses(batch)
                ((nll.sum() + kl) * scale).backward()  # type: ignore[no-untyped-call]  # unannotated in torch
            with torch.no_grad():
                self.hook.observe(batch, nll.detach())
                src = batch.source_ids[:, 1:].to(self.device)[mask]
                totals[0].index_add_(0, src, nll.detach()[mask].double())
                totals[1].index_add_(0, src, torch.ones_like(src, dtype=totals.dtype))
        grad_norm = self.parallel.clip(self.spec.gradient.clip)
        distributed.all_reduce_sum(totals)
        self.hook.end_step(self.metrics)
        nll_sums, counts, read_all, kept_all = totals.tolist()
        read, kept = dict(zip(names, read_all)), dict(zip(names, kept_all))
        limit = self.spec.data.curation.max_dropped_share
        if starved_sources(read, kept, limit):  # on every rank: the counts are global
            dropped_by = self.data.curation_report().get("droppedBySource", {})
            raise Refused(starvation(read, kept, limit, dropped_by))
        loss = sum(nll_sums) / n_global
        source_losses = {name: total / count for name, total, count in zip(names, nll_sums, counts)
                         if count > 0}
        verdict = self.anomaly.observe(loss, grad_norm, source_losses)
        if verdict is None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss, grad_norm, int(n_global), verdict, source_losses,
                           dropped_shares(read, kept))

    # ------------------------------------------------------------------- evals, checkpoints
    def evaluate(self, is_base: bool = False) -> dict[str, float]:
        # Every rank evaluates its share of the samples and ends with the same results
        # (`evals/evaluator.py`), whatever the strategy.
        results: dict[str, float] = {}
        if self.evaluator is not None:
            with self.clock.timed("evaluating"):
                results = self.evaluator.evaluate(self.model)
                results.update(self.hook.evaluate(self.model, self.evaluator))
                self.parallel.reshard()
        self.metrics.evals(results, step=self.step, tokens=self.tokens, base=is_base)
        return results

    def save(self, evals: dict[str, float], train_loss: float | None,
             evaluation: dict[str, float] | None = None) -> str:
        cfg = self.cfg
        mode = self.start.mode.value if self.start.uri else RestoreMode.weights_only.value
        lineage = Lineage(run=cfg.run, run_uid=cfg.run_uid, attempt=cfg.attempt,
                          parent=self.last_checkpoint or self.start.uri,
                          base_uri=self.spec.base_model.uri, base_sha256=self.base_sha,
                          restore_mode=mode, data_version=self.data.data_version,
                          tokenizer_hash=self.tok_hash, config_hash=self.config_hash,
                          overrides={"lrScale": cfg.overrides.lr_scale,
                                     "replayDelta": cfg.overrides.replay_delta},
                          skips=merge_skips(cfg.overrides.skips, self.skips),
                          eval_digests=self.evaluator.digests if self.evaluator else {},
                          code_version=code_version(cfg.image))
        train_state = {"step": self.step, "tokens": self.tokens, "worldSize": self.dist.world_size,
                       "anomaly": self.anomaly.state_dict(), "schedule": self.schedule.as_dict()}

        def model_files(directory: str) -> None:
            self.model.config.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)

        snap = Snapshot(step=self.step, tokens=self.tokens, train_state=train_state,
                        data_state=self.data.state_dict(), lineage=lineage,
                        evals={**evals, **self.hook.checkpoint_metrics()},
                        train_loss=train_loss, stable=not self.unstable,
                        config_json=cfg.dump_json(), write_model_files=model_files,
                        evaluation=evaluation)
        self.clock.saving(self.step)
        with self.clock.timed("checkpointing"):
            uri = self.checkpointer.save(self.model, self.optimizer, snap)
        self.unstable = False
        self.last_saved_step, self.last_checkpoint = self.step, uri
        self._report_saves()
        return uri

    def _report_saves(self, wait: bool = False) -> None:
        """Metrics and events for checkpoints committed in the background (main thread)."""
        if wait:
            with self.clock.timed("checkpointing"):
                self.checkpointer.wait()
        for saved in self.checkpointer.completed():
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

    def _checkpoint_due(self) -> bool:
        # evaluated steps are checkpoints when a separate process evaluates them
        separate = self._separate and self.spec.evaluation.evaluates_at(self.step)  # type: ignore[union-attr]
        return self.step % self.spec.checkpoint.every == 0 or self.step >= self.total or separate

    def _eval_due(self) -> bool:
        ev = self.spec.evaluation
        return ev is not None and not self._separate and (ev.evaluates_at(self.step) or self._checkpoint_due())

    @property
    def _separate(self) -> bool:
        """The control plane evaluates each checkpoint in a process of its own (and the base)."""
        ev = self.spec.evaluation
        return ev is not None and ev.placement == Placement.separate

    def _boundary(self, train_loss: float | None) -> None:
        """Evaluate and/or checkpoint after a step, as the spec says."""
        evals = self.evaluate() if self._eval_due() else None
        if self._checkpoint_due() or self.stop_requested:
            # The evaluation is announced with its checkpoint, once that is committed: a control
            # plane acting on it (a rollback kills this attempt) finds the checkpoint it names.
            self.save(evals or {}, train_loss, evaluation=evals)
        elif evals is not None:
            self._announce_eval(step=self.step, tokens=self.tokens, metrics=evals)

    # ------------------------------------------------------------------------------- run
    def _agree_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested or self.signalled else 0.0], device=self.device)
        agreed = distributed.all_reduce_sum(flag).item() > 0
        self.stop_requested = self.stop_requested or agreed
        return self.stop_requested

    def run(self) -> int:
        self.begin()
        while self.step < self.total:
            if self._agree_stop():
                break
            code = self.advance()
            if code is not None:
                return code
        return self.finish()

    def begin(self) -> None:
        """Set up, announce the attempt, and measure the base once when starting from it."""
        self.setup()
        cfg = self.cfg
        loaded = distributed.gather_objects(total_read())
        self.clock.started(self.step)
        started = self.events.emit(Started, attempt=cfg.attempt, step=self.step, tokens=self.tokens,
                                   restore_from=self.start.uri, world_size=self.dist.world_size,
                                   metrics_url=self.metrics.url, base_sha256=self.base_sha,
                                   loaded_bytes=loaded, setup_seconds=time.monotonic() - self.began,
                                   restart=self.clock.restarts, times=self._times())
        if started is not None:  # where the control plane learns the digest the run records
            store.put_atomic(cfg.checkpoint_uri, STARTED,
                             started.model_dump_json(by_alias=True).encode())
        self.metrics.up(True)
        self.metrics.gates(self.spec, {})
        if self.evaluator is not None and not self._separate and self.start.uri is None and self.step == 0:
            base = self.evaluate(is_base=True)
            self.metrics.gates(self.spec, base)
            self._announce_eval(step=0, tokens=0, metrics=base, is_base=True)

    def _times(self) -> Any:
        times = self.clock.report(self.step)
        self.metrics.times(times)
        return times

    def advance(self) -> int | None:
        with self.clock.step():
            return self._advance()

    def _advance(self) -> int | None:
        """One optimizer step and everything a step owes: metrics, events, anomaly handling,
        evaluation and checkpoint when due. Returns an exit code when the attempt must end."""
        began = time.perf_counter()
        consumed = self.data.consumed_tokens()
        out = self.train_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        self.step += 1
        self.tokens += self.tokens_per_step
        tps = self.tokens_per_step / seconds
        mfu = self.flops_token * tps / (self.peak * self.dist.world_size) if self.peak else None
        skipped = out.verdict is not None
        self.metrics.step(step=self.step, tokens=self.tokens, loss=out.loss,
                          lr=self.schedule(self.step - 1), grad_norm=out.grad_norm,
                          tokens_per_s=tps, skipped=skipped, mfu=mfu)
        self.metrics.anomaly_band(self.anomaly)
        if out.verdict is not None:
            if self.anomaly.consecutive == 1:
                self._streak_from, self._streak_step, self._blamed = consumed, self.step, []
            code = self._on_anomaly(out)
            if code is not None:
                return code
        else:
            self.last_loss = out.loss
        self.data.report_losses(out.source_losses)
        roles = dict(zip(self.data.source_names, self.data.roles))
        self.metrics.mixture(roles, self.data.current_weights(), self.data.realised_proportions())
        self.metrics.sources(roles, out.source_losses, out.dropped_shares)
        if self.step % self.spec.training.log_every == 0 or self.step == self.total:
            self.events.emit(Progress, step=self.step, tokens=self.tokens, loss=_finite(out.loss),
                             lr=self.schedule(self.step - 1), grad_norm=_finite(out.grad_norm),
                             tokens_per_s=tps, skipped=skipped, times=self._times())
        self._agree_stop()
        self._boundary(self.last_loss)
        self._report_saves()
        return None

    def finish(self) -> int:
        if self.stop_requested:
            if self.last_saved_step != self.step:
                self.save({}, self.last_loss)
            self._report_saves(wait=True)
            self.events.emit(Finished, step=self.step, tokens=self.tokens, reason="interrupted", times=self._times(),
                             message="stopped on request after a checkpoint")
            # the signal reached another rank only: its pod went, this one's did not
            return 0 if self.signalled else EXIT_PEER_STOPPED
        if self.last_saved_step != self.step:
            self._boundary(self.last_loss)
        self._report_saves(wait=True)
        self.events.emit(Finished, step=self.step, tokens=self.tokens, reason="budget", times=self._times(),
                         message=f"budget reached: {self.step} steps, {self.tokens:,} tokens")
        return 0

    def _on_anomaly(self, out: StepOutcome) -> int | None:
        verdict = out.verdict
        assert verdict is not None
        self.unstable = True
        self.metrics.anomaly(verdict.kind)
        if verdict.source is not None:
            self._blamed.append(verdict.source)
        self.events.emit(Anomaly, step=self.step, kind=verdict.kind, value=_finite(verdict.value),
                         threshold=verdict.threshold, message=verdict.message,
                         source=verdict.source)
        log.warning("step %d skipped: %s%s", self.step, verdict.message,
                    f" (source {verdict.source})" if verdict.source else "")
        action = self.spec.gradient.anomaly.on_non_finite
        if verdict.kind == "non_finite" and action == NonFiniteAction.stop:
            self.events.emit(Finished, step=self.step, tokens=self.tokens, reason="anomaly",
                             message=verdict.message)
            return EXIT_ANOMALY
        # Rank 0's data positions on every rank: whether to restore is a collective decision.
        window = distributed.broadcast_object(self._skip_window())
        assert window is None or isinstance(window, DataSkip)
        known = self._touching(window)
        if known is not None:
            assert window is not None  # _touching returns None when window is None
            self._widen(known, window)
        elif self.anomaly.needs_restore or (verdict.kind == "non_finite"
                                            and action == NonFiniteAction.rollback):
            self._recover(window)
        return None

    def _touching(self, window: DataSkip | None) -> DataSkip | None:
        """The known window (this attempt's or one it was told to skip) that the current run of
        anomalous steps continues: same source, begun inside or right at its end."""
        if window is None:
            return None
        for known in reversed([*self.skips, *self.cfg.overrides.skips]):
            if known.source == window.source and known.start <= window.start <= known.end:
                return known
        return None

    def _widen(self, known: DataSkip, window: DataSkip) -> None:
        """The bad stretch goes on: skip it without another restore (its steps were skipped,
        the weights are still the stable ones)."""
        self.anomaly.consecutive = 0
        if window.end <= known.end:
            return
        wider = known.model_copy(update={"end": window.end})
        self._record_skips(merge_skips(self.skips, [wider]))
        self.metrics.anomaly("skipped")
        self.events.emit(Anomaly, step=self.step, kind="skipped", source=wider.source, skip=wider,
                         message=f"anomalies go on in source {wider.source}: its skipped window "
                                 f"grows to tokens {wider.start}-{wider.end}")

    def _recover(self, window: DataSkip | None) -> None:
        """Restore the last stable checkpoint; the data moves on, past the blamed window."""
        self.anomaly.consecutive = 0
        with self.clock.timed("anomalies"):
            origin = self._restore_stable()
        if window is not None:
            self._record_skips(merge_skips(self.skips, [window]))
        blame = (f"; source {window.source} is blamed, its tokens {window.start}-{window.end} "
                 f"are skipped" if window else "")
        self.metrics.anomaly("restored")
        self.events.emit(Anomaly, step=self.step, kind="restored",
                         source=window.source if window else None, skip=window,
                         message=f"restored weights and optimizer from {origin} after "
                                 f"{self.spec.gradient.anomaly.max_consecutive} anomalous steps{blame}")

    def _record_skips(self, skips: list[DataSkip]) -> None:
        """The attempt's windows, kept and written where the control plane reads them (the
        operator cannot read this attempt's events)."""
        self.skips = skips
        if self.dist.is_main:
            store.put_atomic(self.cfg.checkpoint_uri, SKIPS, SKIP_LIST.dump_json(skips, by_alias=True))

    def _skip_window(self) -> DataSkip | None:
        """The stretch of the most blamed source read by the current run of anomalous steps."""
        if not self._blamed:
            return None
        source = Counter(self._blamed).most_common(1)[0][0]
        start = self._streak_from.get(source, 0)
        end = self.data.consumed_tokens()[source]
        if end <= start:
            return None
        return DataSkip(source=source, start=start, end=end, attempt=self.cfg.attempt,
                        step=self._streak_step)

    def close(self) -> None:
        checkpointer = getattr(self, "checkpointer", None)
        if checkpointer is not None:
            checkpointer.close()
        self.metrics.up(False)
        self.metrics.close()
        self.events.close()


class AnomalyStop(Exception):
    """An earlier trainer of this attempt stopped on an anomaly rule (onNonFinite: stop): a trainer
    restarted in place stops the same way at once."""


def _check_tokenizer_version(expected: str | None, actual: str, source: str) -> None:
    """`tokenizer.version` pins the tokenizer a run was planned with (its hash, or a prefix of
    at least 12 hex digits): a silently changed tokenizer would change every token id."""
    if expected is None:
        return
    want = expected.lower()
    if len(want) < 12 or not actual.startswith(want):
        raise Refused(f"tokenizer version mismatch: tokenizer.version in the spec is {expected}, the "
                      f"tokenizer from {source} has hash {actual} (a version is that hash, or a "
                      "prefix of at least 12 of its hex digits)")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _read_json(directory: str, name: str) -> dict[str, Any]:
    with open(os.path.join(directory, name), encoding="utf-8") as f:
        return json.load(f)  # type: ignore[no-any-return]


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
