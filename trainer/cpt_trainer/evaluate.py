"""One checkpoint (or the base) evaluated in a process of its own: what `evaluation.placement:
separate` runs, `python -m cpt_trainer --config C --evaluate TARGET` (under torchrun or alone).

The checkpoint is loaded as a restore would load it (sharded: each rank reads only its slices,
verified block by block), the run's suites run exactly as the trainer runs them inline (the same
`Evaluator`, the run's hook), and the result becomes the evaluation record the control plane
already reads (`api.manifest.eval_record_name` in the checkpoint's attempt folder, with the
checkpoint's name). A record is written once: one found already is the answer (a retried or
duplicated evaluation changes nothing), and nothing else of the run is written.
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta

import fsspec
import torch

from cpt_api import store
from cpt_api.events import Evaluated
from cpt_api.manifest import MODEL_DIR, checkpoint_name, eval_record_name, step_of
from cpt_api.spec import EvaluationSpec, Precision
from cpt_api.status import BASE
from cpt_api.storage import storage_options
from cpt_api.trainer_config import TrainerConfig

from . import checkpoint, distributed, extension
from .checkpointer import Checkpointer
from .distributed import Dist
from .errors import Refused
from .weight_store import WeightStore
from .weights import Weights, build, fill
from .model import attention_backend, load_tokenizer
from .parallel import parallelize

log = logging.getLogger(__name__)


def record_exists(cfg: TrainerConfig, step: int) -> bool:
    uri = checkpoint.join(cfg.checkpoint_uri, eval_record_name(step))
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return bool(fs.exists(path))


def evaluate_target(cfg: TrainerConfig, target: str) -> Evaluated | None:
    """Evaluate `target` (`base`, or a checkpoint name `step-XXXXXXXX` in the config's attempt
    folder) on every rank; returns the record rank 0 wrote (None elsewhere, or when one existed)."""
    spec, evaluation = cfg.spec, cfg.spec.evaluation
    if evaluation is None:
        raise Refused("the spec has no evaluation suites")
    use_cuda = torch.cuda.is_available()
    dist = distributed.setup(use_cuda, timedelta(seconds=spec.training.parallelism.collective_timeout_seconds))
    is_base = target == BASE
    step = 0 if is_base else step_of(target)
    if step is None:
        raise Refused(f"--evaluate takes `base` or a checkpoint name step-XXXXXXXX, not {target!r}")
    # before anything is fetched: a retried or repeated evaluation finds its answer written
    if distributed.broadcast_object(record_exists(cfg, step) if dist.is_main else None):
        log.info("%s is evaluated already", target)
        return None
    weights = WeightStore(spec.base_model, dist)
    if is_base:
        tokens, start = 0, weights.base_weights()
    else:
        source = weights.open(checkpoint.join(cfg.checkpoint_uri, target), (MODEL_DIR,))
        manifest = source.manifest
        assert manifest is not None  # open() read it
        tokens, start = manifest.tokens, Weights.of_checkpoint(source)
    compute = torch.bfloat16 if spec.training.precision == Precision.bf16 or (
        spec.training.precision == Precision.auto and use_cuda) else None
    results = _evaluate(cfg, evaluation, dist, weights, start, compute, target)
    if not dist.is_main:
        return None
    record = Evaluated(step=step, tokens=tokens, metrics=results, is_base=is_base,
                       checkpoint=None if is_base else checkpoint_name(step), time=time.time())
    store.put_atomic(cfg.checkpoint_uri, eval_record_name(step), record.model_dump_json(by_alias=True).encode())
    return record


def _evaluate(cfg: TrainerConfig, evaluation: EvaluationSpec, dist: Dist, weights: WeightStore, start: Weights,
              compute: torch.dtype | None, target: str) -> dict[str, float]:
    """The run's suites (and its hook's metrics) on `start`'s weights, as the trainer runs them."""
    spec = cfg.spec
    attention = attention_backend(spec.training.attention, dist.device)
    tokenizer = load_tokenizer(spec.base_model, spec.tokenizer, weights.base_path())
    hook = extension.build_hook(cfg, tokenizer, rank=dist.rank, is_main=dist.is_main)
    tokenizer = hook.tokenizer(tokenizer)
    # the loader's collectives (DCP) go through a checkpointer's group; this one saves nothing
    checkpointer = Checkpointer(cfg.checkpoint_uri, dist, keep=spec.checkpoint.keep, async_save=False)
    try:
        loading = build(start, hook, attention=attention)
        parallel = parallelize(loading.model, spec.training.parallelism, dist,
                               procs_per_node=spec.resources.procs_per_node, compute_dtype=compute)
        fill(loading, start, hook, checkpointer)
        reference = weights.reference(hook, parallel, checkpointer, dtype=compute or torch.float32,
                                      attention=attention) if evaluation.needs_reference else None
        from .evals import Evaluator

        evaluator = Evaluator(evaluation, tokenizer, device=dist.device, seq_len=spec.packing.seq_len,
                              autocast_dtype=compute, reference=reference)
        began = time.monotonic()
        results: dict[str, float] = evaluator.evaluate(parallel.model)
        results.update(hook.evaluate(parallel.model, evaluator))
        log.info("evaluated %s in %.1f s: %s", target, time.monotonic() - began, results)
    finally:
        checkpointer.close()
    return results


def run_evaluation(cfg: TrainerConfig, target: str) -> int:
    """The process's exit code: 0 once the record exists, EXIT_REFUSED when the configuration
    cannot work (a missing checkpoint, a broken suite), else the error propagates (non-zero)."""
    from cpt_api.exit_codes import EXIT_REFUSED

    try:
        evaluate_target(cfg, target)
        return 0
    except Refused as exc:
        log.error("refused: %s", exc)
        return EXIT_REFUSED
    finally:
        distributed.teardown()


__all__ = ["evaluate_target", "run_evaluation"]
