"""Benchmark suites: lm-evaluation-harness tasks on the model in memory.

The harness does the work (task YAMLs, few-shot contexts, loglikelihood and generation requests,
metrics, standard errors); this module only hands it the model through its `HFLM` wrapper and
reads the suite's metric back. A suite's value is the mean of its tasks' metric weighted by their
sample counts, and its standard error the matching combination of the tasks' errors.

Under torchrun every rank runs the whole benchmark on the model (an HFLM built on a model object
is a single-process evaluator): every rank makes the same forward passes in the same order, so
under fsdp they are collectives that all ranks enter together, and every rank ends with the same
result. That is redundant work under fsdp and ddp; splitting the requests among ranks is left for
later.

`uri` (optional) is a directory of task YAMLs for private benchmarks: a local path, or any
fsspec URL, copied once to a local directory (the YAMLs' own data paths must be readable where
the trainer runs).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
import torch
from transformers import PreTrainedTokenizerBase

from cpt_api.evaluation import SuiteSpec

from ..errors import Refused

log = logging.getLogger(__name__)


class BenchmarkError(Refused):
    """A benchmark suite cannot run as specified (unknown task, unreadable task directory)."""


class Benchmark:
    """One benchmark suite, made ready once: its task directory on local disk (a remote one copied
    once) and lm-eval's task index (indexing the ~15,000 built-in tasks takes seconds; a suite
    whose tasks are all in its own directory indexes only that)."""

    def __init__(self, suite: SuiteSpec):
        assert suite.benchmark is not None
        self.suite, self.directory = suite, _local_tasks(suite)
        self._manager: Any = None

    def digest(self) -> str:
        """What the suite measures, for lineage: its settings and the bytes of its task directory
        (built-in tasks are named by the lm-eval version that defines them)."""
        from importlib.metadata import version

        h = hashlib.sha256(self.suite.model_dump_json(by_alias=True, exclude={"name", "uri"}).encode())
        h.update(f"lm-eval {version('lm-eval')}".encode())
        if self.directory is not None:
            for root, _, names in sorted(os.walk(self.directory)):
                for name in sorted(names):
                    path = os.path.join(root, name)
                    h.update(os.path.relpath(path, self.directory).encode())
                    with open(path, "rb") as f:
                        h.update(hashlib.sha256(f.read()).digest())
        return h.hexdigest()

    def manager(self) -> Any:
        """lm-eval's TaskManager for the suite's tasks; BenchmarkError names a task it lacks."""
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            tasks = self.suite.benchmark.tasks if self.suite.benchmark else []
            manager = TaskManager(include_path=self.directory, include_defaults=False) if self.directory else None
            if manager is None or any(t not in manager.all_tasks for t in tasks):
                manager = TaskManager(include_path=self.directory)
            unknown = [t for t in tasks if t not in manager.all_tasks]
            if unknown:
                raise BenchmarkError(f"benchmark suite {self.suite.name!r}: lm-eval knows no task {', '.join(unknown)}"
                                     + (f" (nor do the YAMLs in {self.suite.uri})" if self.suite.uri else ""))
            self._manager = manager
        return self._manager

    def run(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, seq_len: int,
            device: torch.device) -> tuple[float, float]:
        """(value, standard error) of the suite's metric; call inside `runtime.inference`."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        bench = self.suite.benchmark
        assert bench is not None
        manager = self.manager()
        # a copy: the wrapper may set a pad token on it, and the run's tokenizer is saved with checkpoints
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=bench.batch_size,
                  max_length=seq_len, device=str(device))
        with _local_rank_zero():
            out = simple_evaluate(model=lm, tasks=list(bench.tasks), num_fewshot=bench.num_fewshot,
                                  limit=bench.limit, task_manager=manager, log_samples=False, random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        if out is None:
            raise BenchmarkError(f"benchmark suite {self.suite.name!r}: lm-eval returned no results")
        return combine(self.suite, out["results"])


def _local_tasks(suite: SuiteSpec) -> str | None:
    """The suite's task YAMLs as a local directory (a remote one copied), or None."""
    if suite.uri is None:
        return None
    fs, path = fsspec.core.url_to_fs(suite.uri)
    if not fs.isdir(path):
        raise BenchmarkError(f"benchmark suite {suite.name!r}: {suite.uri} is not a directory of task YAMLs")
    if isinstance(fs, LocalFileSystem):
        return str(path)
    local = tempfile.mkdtemp(prefix=f"cpt-tasks-{suite.name}-")
    fs.get(path.rstrip("/") + "/", local + "/", recursive=True)
    return local


@contextlib.contextmanager
def _local_rank_zero() -> Iterator[None]:
    """lm-eval returns results only where LOCAL_RANK is 0 (it takes any torchrun group for one of
    its own tensor-parallel launches); here each rank is a whole evaluator, so each gets them."""
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = saved


def combine(suite: SuiteSpec, results: Mapping[str, Mapping[str, Any]]) -> tuple[float, float]:
    """The suite's value and standard error from lm-eval's per-task results."""
    assert suite.benchmark is not None
    metric = suite.metric.value
    values, errors, sizes = [], [], []
    for task in suite.benchmark.tasks:
        found = results.get(task, {})
        value = found.get(f"{metric},none")
        if value is None:
            reported = sorted(k.split(",")[0] for k in found if "," in k and "_stderr" not in k)
            raise BenchmarkError(f"benchmark suite {suite.name!r}: task {task} reports no {metric} "
                                 f"(it reports {', '.join(reported) or 'nothing'})")
        error = found.get(f"{metric}_stderr,none")
        values.append(float(value))
        errors.append(float(error) if isinstance(error, (int, float)) else math.nan)
        sizes.append(int(found.get("sample_len") or 1))
    total = sum(sizes)
    value = sum(v * n for v, n in zip(values, sizes)) / total
    stderr = math.sqrt(sum((e * n / total) ** 2 for e, n in zip(errors, sizes)))
    return value, stderr
