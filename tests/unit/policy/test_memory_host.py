"""The host plan: each rank's parts while loading and while training, and the pod's total."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from cpt_operator.policy.memory import GIB, estimate
from cpt_operator.policy.memory_fix import smallest_fix, wont_fit
from cpt_operator.policy.memory_host import MIB, host_estimate
from tests.unit.policy.memory_cases import LLAMA3_8B, TINY, spec

P = LLAMA3_8B.params
EMBEDDING = 128256 * 4096
FSDP = {"training": {"parallelism": {"strategy": "fsdp"}}}
OFFLOAD = {"training": {"parallelism": {"strategy": "fsdp", "cpuOffload": True}}}
CPU = {"resources": {"gpusPerNode": 0, "nprocPerNode": 2}, **FSDP}
GGUF = {"baseModel": {"uri": "s3://models/llama-3-8b.Q4_K_M.gguf", "format": "gguf"}}
REF_KL = {"regularization": {"refKL": {"beta": 0.1}}}
SYNC = {"checkpoint": {"asynchronous": False}}
WORKER = 3 * GIB // 4

PARTS = [
    pytest.param(FSDP, "training", "process", 2 * GIB,
                 id="a GPU rank's process holds the interpreter, torch and the CUDA runtime's host side"),
    pytest.param(CPU, "loading", "process", 3 * GIB // 4, id="a CPU rank's process is the interpreter and torch"),
    pytest.param(FSDP, "loading", "load", 4 * EMBEDDING // 8,
                 id="a rank reads its slice of the largest tensor whole, in fp32"),
    pytest.param({}, "loading", "load", 4 * EMBEDDING, id="a ddp rank reads the whole of each tensor"),
    pytest.param({**GGUF, **FSDP}, "loading", "load", 8 * P,
                 id="a GGUF base is dequantised whole on every rank, with a second copy while converting"),
    pytest.param(FSDP, "loading", "weights", 0, id="a GPU rank's weights go to the GPU as they are read"),
    pytest.param({**FSDP, **REF_KL}, "loading", "weights", 0, id="and so does the reference's"),
    pytest.param(OFFLOAD, "loading", "weights", 4 * P // 8,
                 id="with cpu offload the parameter shard is loaded into host memory"),
    pytest.param({**CPU, **REF_KL}, "loading", "weights", 4 * P // 2 + 4 * P // 2,
                 id="a CPU rank holds its shards of the parameters and the reference once loaded"),
    pytest.param(FSDP, "training", "staging", 12 * P // 8,
                 id="asynchronous saves stage the rank's fp32 parameters and AdamW moments"),
    pytest.param({}, "training", "staging", 12 * P, id="a ddp rank stages its whole replica"),
    pytest.param({"training": {"parallelism": {"strategy": "hsdp"}}, "resources": {"nodes": 4}}, "training",
                 "staging", 12 * P // 8, id="an hsdp rank stages its shard within the node"),
    pytest.param({**FSDP, **SYNC}, "training", "staging", 0, id="synchronous saves stage nothing"),
    pytest.param(OFFLOAD, "training", "offloaded", 16 * P // 8,
                 id="cpu offload keeps the rank's parameters, gradients and AdamW state on the host"),
    pytest.param(FSDP, "training", "offloaded", 0, id="without cpu offload no state is on the host"),
    pytest.param(FSDP, "training", "data_worker", WORKER,
                 id="a GPU rank's data worker holds its own interpreter and libraries"),
    pytest.param(OFFLOAD, "training", "data_worker", WORKER,
                 id="pinned offloaded state is shared with the data worker, not copied"),
    pytest.param(CPU, "training", "data_worker", WORKER + 12 * P // 2,
                 id="a CPU rank's data worker keeps the parameters and moments it forked with"),
    pytest.param(FSDP, "training", "step", 0, id="a GPU rank's step is GPU memory"),
]


@pytest.mark.parametrize("sections, moment, part, expected", PARTS)
def test_parts(sections: dict[str, Any], moment: str, part: str, expected: int) -> None:
    assert getattr(host_estimate(spec(**sections), LLAMA3_8B), moment)[part] == expected


def test_a_cpu_run_counts_its_step_less_the_process_it_already_counts() -> None:
    cpu = spec(**CPU)
    host, step = host_estimate(cpu, LLAMA3_8B), estimate(cpu, LLAMA3_8B)
    assert host.training["step"] + host.training["process"] == step.total


def test_a_small_model_is_read_through_one_64_mib_buffer() -> None:
    assert host_estimate(spec(**FSDP), TINY).loading["load"] == 64 * MIB


MOMENTS = [
    pytest.param(FSDP, "training", "staging", id="an HF base peaks once checkpoints are staged"),
    pytest.param({**GGUF, **FSDP}, "loading", "load", id="a GGUF base peaks while it is dequantised"),
    pytest.param({**OFFLOAD, **SYNC}, "training", "offloaded",
                 id="offloaded state outgrows its load once gradients and moments exist"),
]


@pytest.mark.parametrize("sections, moment, largest", MOMENTS)
def test_the_rank_peaks_at_the_larger_moment(sections: dict[str, Any], moment: str, largest: str) -> None:
    plan = host_estimate(spec(**sections), LLAMA3_8B)
    assert plan.peak_moment == moment
    assert plan.rank == max(sum(plan.loading.values()), sum(plan.training.values()))
    assert plan.largest(1)[0].split()[0] == largest


POD = [
    pytest.param(FSDP, 8, id="a pod of 8 GPUs holds 8 ranks and the launcher"),
    pytest.param(CPU, 2, id="a CPU pod holds its nprocPerNode ranks and the launcher"),
    pytest.param({"training": {"parallelism": {"strategy": "hsdp"}}, "resources": {"nodes": 4}}, 8,
                 id="a pod is one node's ranks, whatever the number of nodes"),
]


@pytest.mark.parametrize("sections, ranks", POD)
def test_the_pod_holds_one_node_of_ranks_and_the_launcher(sections: dict[str, Any], ranks: int) -> None:
    plan = host_estimate(spec(**sections), LLAMA3_8B)
    assert plan.total == ranks * plan.rank + GIB // 2


def test_llama_3_8b_on_eight_gpus_needs_about_112_gib_of_host_memory() -> None:
    """fsdp over 8 GPUs: 8 × (2 GiB process + 11.2 GiB staging + 0.75 GiB data worker) + the
    launcher; with cpu offload the 15 GiB of offloaded state per rank comes on top."""
    plain = host_estimate(spec(**FSDP), LLAMA3_8B)
    offload = host_estimate(spec(**OFFLOAD), LLAMA3_8B)
    assert 110 * GIB < plain.total < 115 * GIB
    assert offload.total - plain.total == 8 * 16 * P // 8


def _host_total(**sections: Any) -> int:
    return host_estimate(spec(**sections), LLAMA3_8B).total


def _with(sections: dict[str, Any], **resources: Any) -> dict[str, Any]:
    return {**sections, "resources": {**sections.get("resources", {}), **resources}}


NO_GPU_LIMIT = {"gpuMemory": None}
SELECTIVE = {"parallelism": {"strategy": "fsdp", "activationCheckpointing": "selective"}}
FIXES = [
    pytest.param(lambda: _with(FSDP, memory=str(_host_total(**FSDP, **SYNC))), "checkpoint.asynchronous: false",
                 id="staging that does not fit is dropped first"),
    pytest.param(lambda: _with(OFFLOAD, memory=str(_host_total(**FSDP))), "training.parallelism.cpuOffload: false",
                 id="offload the GPUs can do without is turned off first"),
    pytest.param(lambda: _with(OFFLOAD, memory=str(max(_host_total(**FSDP), _host_total(**OFFLOAD, **SYNC)))),
                 "training.parallelism.cpuOffload: false",
                 id="where either would fit offload is turned off before staging: offload costs every step"),
    pytest.param(lambda: _with(OFFLOAD, memory=str(_host_total(**OFFLOAD, **SYNC)),
                               gpuMemory=str(estimate(spec(**OFFLOAD), LLAMA3_8B).total)),
                 "checkpoint.asynchronous: false", id="offload the GPUs need stays and the staging goes"),
    pytest.param(lambda: _with({}, memory=str(_host_total(**FSDP)), **NO_GPU_LIMIT),
                 "training.parallelism.strategy: fsdp", id="replicated staging is sharded first"),
    pytest.param(lambda: _with({**CPU, **SYNC}, memory=str(_host_total(**{**CPU, **SYNC, "training": SELECTIVE})),
                               **NO_GPU_LIMIT),
                 "training.parallelism.activationCheckpointing: selective",
                 id="a CPU run's step is host memory, which activation checkpointing saves"),
    pytest.param(lambda: _with({**GGUF, **FSDP}, memory="256Gi"),
                 f"resources.memory: {-(-_host_total(**GGUF, **FSDP) // GIB)}Gi",
                 id="a pod nothing else fits asks for the memory it needs, in whole GiB"),
    pytest.param(lambda: _with({}, memory=str(_host_total(**FSDP, **SYNC))),
                 "training.parallelism.strategy: fsdp, checkpoint.asynchronous: false",
                 id="when no single change fits both memories the changes are combined"),
    pytest.param(lambda: _with({"training": {"microBatchSize": 2}}, memory="900Gi",
                               gpuMemory=str(estimate(spec(training={"microBatchSize": 2, "parallelism": {
                                   "strategy": "fsdp", "activationCheckpointing": "full"}}), LLAMA3_8B).total)),
                 "training.parallelism.strategy: fsdp, training.parallelism.activationCheckpointing: full",
                 id="a change the combination does not need is dropped again"),
    pytest.param(lambda: _with({}, memory="16Gi"),
                 f"training.parallelism.strategy: fsdp, resources.memory: {-(-_host_total(**FSDP) // GIB)}Gi",
                 id="when the pod cannot hold its ranks whatever else changes the GPU's fix asks for memory"),
]


@pytest.mark.parametrize("sections, changes", FIXES)
def test_smallest_fix_for_host_memory(sections: Callable[[], dict[str, Any]], changes: str) -> None:
    run = spec(**sections())
    assert wont_fit(run, LLAMA3_8B) is not None
    fix = smallest_fix(run, LLAMA3_8B)
    assert fix is not None and ", ".join(fix.changes) == changes
    assert all(u.fits for u in fix.usages) and fix.usages[-1].what == "host memory per pod"


def test_a_pod_that_does_not_fit_names_host_memory_its_largest_parts_and_the_fix() -> None:
    message = wont_fit(spec(**_with(FSDP, memory="64Gi")), LLAMA3_8B)
    assert message is not None
    head, _, fix = message.partition("; smallest fix: ")
    assert head == ("host memory per pod 112.2 GiB of 64.0 GiB does not fit (8 rank(s) × 14.0 GiB while training "
                    "+ launcher 512.0 MiB; largest a rank: staging 11.2 GiB, process 2.0 GiB)")
    assert fix == ("set checkpoint.asynchronous: false "
                   "(per-GPU 59.2 GiB of 80.0 GiB, host memory per pod 22.5 GiB of 64.0 GiB)")


def test_each_memory_that_does_not_fit_is_named() -> None:
    message = wont_fit(spec(**_with({}, memory="64Gi")), LLAMA3_8B)
    assert message is not None
    assert message.startswith("per-GPU 177.0 GiB of 80.0 GiB does not fit (ddp over 8 GPUs; ")
    assert "; host memory per pod 740.5 GiB of 64.0 GiB does not fit (8 rank(s) × 92.5 GiB while training" in message


def test_a_pod_that_fits_has_no_message() -> None:
    assert wont_fit(spec(**_with(FSDP, memory="128Gi")), LLAMA3_8B) is None
