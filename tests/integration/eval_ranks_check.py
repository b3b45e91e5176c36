"""Run under torchrun: evaluate a tiny model with the trainer's own evaluator on this world size,
first FSDP2-sharded, then as DDP replicas, and write what every rank ends with.

    torchrun --nproc-per-node N tests/integration/eval_ranks_check.py MODEL_DIR CASE.json OUT_DIR

CASE.json holds `evaluation` (an EvaluationSpec), `stops` (token ids that end a generation,
so some outputs end early and others run to maxNewTokens), `newTerms` (token ids for the
tokenizer extension's new-terms slice), `logitBudget` (small, so that suites span several
batches and ranks with smaller shares run padding batches) and `klWindows` (token windows, each
with the source id of every token: the training loss's KL-to-base term is taken over them, each
rank on its rank-strided share of micro-batches of one window, so some ranks have micro-batches
with no replay token at all). Each rank writes
OUT_DIR/<strategy>-rank<r>.json. Without torchrun one process evaluates alone (`evaluate`,
which the test also calls in-process for the one-rank reference).
"""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt_api.evaluation import EvaluationSpec
from cpt_api.spec import ParallelismSpec, Sharding
from cpt_trainer import distributed
from cpt_trainer.distributed import Dist
from cpt_trainer.evals import Evaluator, runtime
from cpt_trainer.extension.evaluation import NewTermsEvaluation
from cpt_trainer.parallel import parallelize, shard_frozen

TIMEOUT = timedelta(seconds=20)
"""A rank that waits this long in one collective fails the run instead of hanging."""


def load(model_dir: str, stops: list[int], *, perturb: bool) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = stops
    if perturb:  # moved away from the base, so that kl_to_base is not zero
        weight = model.model.layers[-1].mlp.down_proj.weight
        with torch.no_grad():
            weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    return model


@contextlib.contextmanager
def logit_budget(budget: int) -> Iterator[None]:
    saved, runtime.LOGIT_BUDGET = runtime.LOGIT_BUDGET, budget
    try:
        yield
    finally:
        runtime.LOGIT_BUDGET = saved


def counting(module: torch.nn.Module) -> list[int]:
    """A counter of `module`'s forward calls."""
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def evaluate(model_dir: str, case: dict[str, Any], strategy: Sharding, info: Dist) -> dict[str, Any]:
    """Every suite and the new-terms slice, as the training loop runs them on this rank."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    parallel = parallelize(load(model_dir, case["stops"], perturb=True),
                           ParallelismSpec(strategy=strategy), info,
                           procs_per_node=info.world_size, compute_dtype=None)
    reference = shard_frozen(load(model_dir, case["stops"], perturb=False), parallel, info, None)
    calls = {"model": counting(parallel.model), "reference": counting(reference)}
    spec = EvaluationSpec.model_validate(case["evaluation"])
    with logit_budget(case["logitBudget"]):
        evaluator = Evaluator(spec, tokenizer, device=info.device, seq_len=64, reference=reference)
        results = evaluator.evaluate(parallel.forward)
        new_terms = NewTermsEvaluation(tokenizer, torch.tensor(case["newTerms"]))
        results.update(new_terms(parallel.forward, evaluator))
    kl = kl_term(parallel, reference, case["klWindows"], info)
    return {"results": results, "generations": evaluator.last_generations, "kl": kl,
            "forwards": {name: count[0] for name, count in calls.items()},
            "reference_sharded": all(isinstance(p, DTensor) for p in reference.parameters())}


def kl_term(parallel: Any, reference: torch.nn.Module, windows: list[dict[str, list[int]]],
            info: Dist) -> float:
    """The refKL term (`refkl.replay_kl`, replay = source 1) summed over every window, each rank
    taking windows rank, rank+W, ...; every rank runs as many micro-batches (the longest share),
    as the training loop does; the sum is all-reduced so every rank holds the total."""
    from cpt_trainer.data import Batch
    from cpt_trainer.refkl import replay_kl

    per_rank = -(-len(windows) // info.world_size)
    mine = windows[info.rank::info.world_size]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(per_rank):
        window = mine[i] if i < len(mine) else {"ids": [0, 0], "sources": [0, 0]}  # a domain-only filler
        ids = torch.tensor([window["ids"]])
        sources = torch.tensor([window["sources"]])
        batch = Batch(ids, ids.clone(), torch.arange(ids.shape[1]).unsqueeze(0), sources, ids.shape[1])
        with torch.no_grad():
            logits = parallel.forward(**batch.model_inputs()).logits[:, :-1].float()
        replay = sources[:, 1:] == 1
        term = replay_kl(reference, batch, logits, replay, flatten=False, collective=parallel.sharded,
                         autocast=contextlib.nullcontext())
        if term is not None and i < len(mine):
            total += term.double()
    parallel.reshard()
    return float(distributed.all_reduce_sum(total).item())


def main(model_dir: str, case_file: str, out_dir: str) -> None:
    info = distributed.setup(use_cuda=False, timeout=TIMEOUT)
    case = json.loads(Path(case_file).read_text())
    for strategy in (Sharding.fsdp, Sharding.ddp):
        report = evaluate(model_dir, case, strategy, info)
        out = Path(out_dir) / f"{strategy.value}-rank{info.rank}.json"
        out.write_text(json.dumps(report))
        del report
    distributed.barrier()  # every rank done before any closes its connections
    distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
