"""Setting an attempt up: the checks that refuse a run before anything is written, then the
model, data, optimizer and checkpoint manager it trains with, in the order every rank follows.

Every step here that talks to other ranks is collective (rank 0 looks, all follow), so the
order of these calls is the same on every rank and must stay so. A fullState start is loaded
last, once every part it fills exists.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cpt_api.manifest import MODEL_DIR, OPTIMIZER_DIR, Lineage, Manifest
from cpt_api.ownership import RunRecord
from cpt_api.spec import Boundary, ModelFormat, OptimizerSpec, RestoreMode, SourceRole
from cpt_api.trainer_config import TrainerConfig

from . import checkpoint, code_version, distributed, extension
from .anomaly import AnomalyDetector
from .checkpoint_manager import CheckpointManager, Parts, Progress, StartPoint, TrainState
from .checkpointer import Checkpointer
from .data import DataPipeline, check_document_isolation, tokenizer_hash
from .distributed import Dist
from .errors import Refused
from .events import EventLog
from .goodput import TimeAccount
from .hooks import RunHook
from .weight_store import WeightStore
from .weights import Weights, build, fill
from .metrics import Metrics
from .model import attention_backend, check_digest, check_recorded_digest, load_tokenizer
from .parallel import Parallel, parallelize
from .perf import flops_per_token, peak_flops
from .recovery import Recovery
from .schedule import Schedule, build_schedule
from .step import Objective, TrainStep

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What the process has before setup: its rank, its compute dtype and its reporting."""

    cfg: TrainerConfig
    dist: Dist
    compute: torch.dtype | None
    """The autocast dtype (None: fp32)."""
    events: EventLog
    clock: TimeAccount
    metrics: Metrics
    progress: Progress


@dataclass
class Model:
    """The model as built from the start point, and what came with it."""

    start: StartPoint
    parallel: Parallel
    hook: RunHook
    tokenizer: PreTrainedTokenizerBase
    tokenizer_hash: str
    base_sha: str
    attention: str
    weights: WeightStore
    checkpointer: Checkpointer


@dataclass
class Built:
    """Everything an attempt trains with, once set up."""

    start: StartPoint
    base_sha: str
    parallel: Parallel
    hook: RunHook
    data: Any
    """The data pipeline, wrapped by the run's hook."""
    anomaly: AnomalyDetector
    schedule: Schedule
    evaluator: Any
    train_step: TrainStep
    ckpt: CheckpointManager
    recovery: Recovery
    total: int
    """Optimizer steps in the budget."""
    tokens_per_step: int
    flops_per_token: float
    peak: float | None
    """This rank's peak FLOP/s (CUDA only), for MFU."""


def setup(rt: Runtime) -> Built:
    """Build the attempt (collective: every rank calls this, in the same order)."""
    cfg, spec, dist = rt.cfg, rt.cfg.spec, rt.dist
    check_owner(cfg, dist)
    m = _model(cfg, dist, rt.compute)
    model = cast(PreTrainedModel, m.parallel.model)
    m.hook.on_start(cfg.checkpoint_uri)
    model.train()
    # Flash-attention honours per-document positions only in a single packed row.
    flatten = m.attention == "flash_attention_2"
    if spec.packing.boundary == Boundary.document_mask:
        # Milliseconds, and it turns a silent cross-document leak into a clear error.
        # Parameters stay fp32 under FSDP mixed precision while the maths runs in bf16: the
        # tolerance follows the compute dtype, not the parameters'.
        check_document_isolation(model, flatten=flatten, atol=5e-2 if rt.compute is not None else None)
        m.parallel.reshard()
    # in bf16 on GPU, sharded like the trained model
    reference = m.weights.reference(m.hook, m.parallel, m.checkpointer, dtype=rt.compute or torch.float32,
                                    attention=m.attention) if spec.needs_reference else None
    evaluator = _evaluator(cfg, m.tokenizer, dist.device, rt.compute, reference)
    data = _data(cfg, m.tokenizer, dist, evaluator, m.hook)
    replay_ids = [i for i, role in enumerate(data.roles) if role == SourceRole.replay.value]
    optimizer = _optimizer(spec.optimizer, model)
    anomaly = AnomalyDetector(spec.gradient.anomaly)
    total = spec.total_steps(dist.world_size)
    schedule = build_schedule(spec, total, cfg.overrides.lr_scale, cfg.overrides.rewarm_from)
    parts = Parts(model, optimizer, TrainState(rt.progress, anomaly, schedule, dist.world_size), data, m.hook,
                  m.tokenizer)
    ckpt = CheckpointManager(m.checkpointer, parts, start=m.start, weights=m.weights, dist=dist, clock=rt.clock,
                             lineage=_lineage(cfg, m, data.data_version, evaluator), config_json=cfg.dump_json(),
                             seed=spec.training.seed)
    if m.start.uri is not None and m.start.mode == RestoreMode.full_state:
        ckpt.load()
    objective = Objective(m.parallel, device=dist.device, autocast_dtype=rt.compute, flatten=flatten,
                          beta=spec.regularization.ref_kl.beta, reference=reference, replay_ids=replay_ids)
    step = TrainStep(objective, training=spec.training, gradient=spec.gradient,
                     max_dropped_share=spec.data.curation.max_dropped_share, optimizer=optimizer,
                     schedule=schedule, data=data, hook=m.hook, anomaly=anomaly, metrics=rt.metrics,
                     world_size=dist.world_size)
    recovery = Recovery(spec.gradient.anomaly, anomaly, ckpt, data=data, told=cfg.overrides.skips,
                        checkpoint_uri=cfg.checkpoint_uri, attempt=cfg.attempt, is_main=dist.is_main,
                        base_uri=spec.base_model.uri, events=rt.events, metrics=rt.metrics, clock=rt.clock)
    return Built(m.start, m.base_sha, m.parallel, m.hook, data, anomaly, schedule, evaluator, step, ckpt, recovery,
                 total, spec.tokens_per_step(dist.world_size), flops_per_token(model, spec.packing.seq_len),
                 peak_flops(dist.device) if dist.device.type == "cuda" else None)


def _model(cfg: TrainerConfig, dist: Dist, compute: torch.dtype | None) -> Model:
    """The start point's weights in the run's (maybe extended) model, checked against the run."""
    spec = cfg.spec
    checkpointer = Checkpointer(cfg.checkpoint_uri, dist, keep=spec.checkpoint.keep,
                                async_save=spec.checkpoint.asynchronous,
                                root=cfg.checkpoint_root, restore_from=cfg.restore_from)
    attention = attention_backend(spec.training.attention, dist.device)
    weights = WeightStore(spec.base_model, dist)
    base_path = weights.base_path()
    base_sha = weights.base_digest()
    start, manifest = _start_point(cfg, dist, weights)
    check_digest(spec.base_model, base_sha)
    check_recorded_digest(spec.base_model.uri, cfg.base_sha256, base_sha)
    tokenizer = load_tokenizer(spec.base_model, spec.tokenizer, base_path)
    _check_tokenizer_version(spec.tokenizer.version, tokenizer_hash(tokenizer),
                             spec.tokenizer.uri or spec.base_model.uri)
    hook = extension.build_hook(cfg, tokenizer, rank=dist.rank, is_main=dist.is_main)
    tokenizer = hook.tokenizer(tokenizer)
    tok_hash = tokenizer_hash(tokenizer)
    if manifest is not None:
        _check_lineage(cfg, start, manifest, hook.accepts(manifest.lineage.tokenizer_hash, start.mode),
                       hook.describe(spec.tokenizer.uri or f"the base model {spec.base_model.uri}"),
                       tok_hash, base_sha)
    loading = build(start.weights, hook, attention=attention)
    parallel = parallelize(loading.model, spec.training.parallelism, dist,
                           procs_per_node=spec.resources.procs_per_node, compute_dtype=compute)
    fill(loading, start.weights, hook, checkpointer)
    log.info("model on %s x %d: %s, attention %s, compute %s, weights from %s%s", dist.device.type,
             dist.world_size, parallel.strategy.value if parallel.strategy else "single",
             attention, "bf16" if compute is not None else "fp32",
             start.weights.describe(), _read_note(start.weights))
    start = dataclasses.replace(start, grown=tuple(loading.grown))
    return Model(start, parallel, hook, tokenizer, tok_hash, base_sha, attention, weights, checkpointer)


def _start_point(cfg: TrainerConfig, dist: Dist, weights: WeightStore) -> tuple[StartPoint, Manifest | None]:
    """Where the weights come from, and the manifest of the checkpoint they come from (if one)."""
    base = cfg.spec.base_model
    mode = cfg.restore_mode or base.restore_mode
    uri = cfg.restore_from
    if uri is None and base.format == ModelFormat.checkpoint:
        uri = base.uri
    own = _own_newest(cfg, dist)
    if own is not None:  # restarted in place: continue where this attempt last saved
        uri, mode = own, RestoreMode.full_state
    if uri is None:
        return StartPoint(None, RestoreMode.weights_only, weights.base_weights()), None
    source = weights.open(uri, (MODEL_DIR, OPTIMIZER_DIR) if mode == RestoreMode.full_state else (MODEL_DIR,))
    assert source.manifest is not None  # open() read it
    return StartPoint(uri, mode, Weights.of_checkpoint(source)), source.manifest


def _own_newest(cfg: TrainerConfig, dist: Dist) -> str | None:
    """The attempt's newest committed checkpoint: there is one only when torchrun restarted
    this trainer in place (an attempt's folder is never reused). Rank 0 looks, every rank
    follows, whatever each node's restart count says."""
    found = distributed.broadcast_object(
        checkpoint.latest_valid(cfg.checkpoint_uri, deep=False) if dist.is_main else None)
    return checkpoint.join(cfg.checkpoint_uri, found[0]) if found else None  # type: ignore[index]


def check_owner(cfg: TrainerConfig, dist: Dist) -> None:
    """Before anything is written, pruned or restored: the checkpoint root (and the restore
    point's) must belong to this run, or another run's checkpoints would be overwritten."""
    base = cfg.spec.base_model
    run = RunRecord(uid=cfg.run_uid, name=cfg.run, namespace=cfg.namespace) if cfg.run_uid else None
    checkpoint_base = base.uri if base.format == ModelFormat.checkpoint else None
    problem = distributed.broadcast_object(
        checkpoint.ownership_problem(cfg.checkpoint_root, run, cfg.restore_from, checkpoint_base,
                                     base.import_checkpoint)
        if dist.is_main else None)
    if problem:
        raise Refused(str(problem))


def _check_lineage(cfg: TrainerConfig, start: StartPoint, manifest: Manifest, extends: bool, source: str,
                   tok_hash: str, base_sha: str) -> None:
    """Refuse a checkpoint that another tokenizer, base or data stream produced (`extends`: the
    run's hook accepts its tokenizer anyway; `source`: the run's tokenizer, as the hook names it)."""
    lineage, base = manifest.lineage, cfg.spec.base_model
    if lineage.tokenizer_hash != tok_hash and not extends:
        raise Refused(f"tokenizer mismatch: checkpoint {start.uri} was trained with tokenizer "
                      f"{lineage.tokenizer_hash} (its manifest), but this run's tokenizer from "
                      f"{source} has hash {tok_hash}")
    if lineage.base_sha256 and lineage.base_sha256 != base_sha and base.format != ModelFormat.checkpoint:
        raise Refused(f"checkpoint {start.uri} descends from base {lineage.base_uri} "
                      f"(sha256 {lineage.base_sha256}), this run's base {base.uri} "
                      f"has sha256 {base_sha}")


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


def _read_note(weights: Weights) -> str:
    read = weights.source.bytes_read if weights.source is not None else 0
    return f" ({read / 2**20:.1f} MiB read from the store by this rank)" if read else ""


def _evaluator(cfg: TrainerConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device,
               compute: torch.dtype | None, reference: Any) -> Any:
    if cfg.spec.evaluation is None:
        return None
    from .evals import Evaluator

    return Evaluator(cfg.spec.evaluation, tokenizer, device=device, seq_len=cfg.spec.packing.seq_len,
                     autocast_dtype=compute, reference=reference)


def _data(cfg: TrainerConfig, tokenizer: PreTrainedTokenizerBase, dist: Dist, evaluator: Any,
          hook: RunHook) -> Any:
    """This rank's data pipeline (decontaminated against the eval texts), wrapped by the hook."""
    eval_texts = evaluator.texts() if evaluator is not None else ()
    try:
        data = DataPipeline(cfg, tokenizer, dist.rank, dist.world_size,
                            eval_texts=eval_texts, report_dir=cfg.run_dir, share=distributed.from_rank0)
    except (ValueError, FileNotFoundError) as exc:
        # Sources that do not exist or curate to nothing: fixing the spec is the only cure.
        raise Refused(f"data: {exc}") from exc
    return hook.wrap_data(data)


def _optimizer(opt: OptimizerSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and norm gains (1-D tensors), as usual."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": opt.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=cast(tuple[float, float], tuple(opt.betas)), eps=opt.eps)


def _lineage(cfg: TrainerConfig, m: Model, data_version: str, evaluator: Any) -> partial[Lineage]:
    """Every checkpoint's lineage but its parent and skips: what this attempt is."""
    config_hash = hashlib.sha256(cfg.spec.model_dump_json(by_alias=True).encode()
                                 + cfg.overrides.model_dump_json().encode()).hexdigest()
    mode = m.start.mode.value if m.start.uri else RestoreMode.weights_only.value
    return partial(Lineage, run=cfg.run, run_uid=cfg.run_uid, attempt=cfg.attempt,
                   base_uri=cfg.spec.base_model.uri, base_sha256=m.base_sha, restore_mode=mode,
                   data_version=data_version, tokenizer_hash=m.tokenizer_hash, config_hash=config_hash,
                   overrides={"lrScale": cfg.overrides.lr_scale, "replayDelta": cfg.overrides.replay_delta},
                   eval_digests=evaluator.digests if evaluator else {}, code_version=code_version(cfg.image))


__all__ = ["Built", "Runtime", "check_owner", "setup"]
