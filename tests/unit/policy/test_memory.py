"""The memory planner: parameter counts, per-part bytes by strategy, and the smallest fix."""
from __future__ import annotations

from typing import Any

import pytest

from cpt_api.quantity import format_bytes, parse_quantity
from cpt_operator.policy.activations import Dtypes, layer_bytes
from cpt_operator.policy.memory import GIB, estimate
from cpt_operator.policy.memory_fix import smallest_fix, wont_fit
from cpt_operator.policy.model_shape import ModelShape, ShapeError
from tests.unit.policy.memory_cases import LLAMA3_8B, LLAMA3_8B_CONFIG, TINY, spec

P = LLAMA3_8B.params
GATHERED = 2 * LLAMA3_8B.block_params + LLAMA3_8B.root_params
DRIFT = {"evaluation": {"suites": [{"name": "chat", "kind": "drift", "uri": "s3://e/chat.jsonl",
                                    "metric": "kl_to_base"}]}}


def test_llama_3_8b_has_its_published_parameter_count() -> None:
    assert P == 8_030_261_248


SHAPES = [
    pytest.param({**LLAMA3_8B_CONFIG, "tie_word_embeddings": True}, P - 128256 * 4096,
                 id="a tied head is not counted twice"),
    pytest.param({k: v for k, v in LLAMA3_8B_CONFIG.items() if k != "num_key_value_heads"},
                 P + 32 * 2 * 4096 * (4096 - 1024), id="without num_key_value_heads attention is multi-head"),
    pytest.param({**LLAMA3_8B_CONFIG, "head_dim": 64}, P - 32 * 4096 * (2 * 2048 + 2 * 512),
                 id="an explicit head_dim overrides hidden over heads"),
]


@pytest.mark.parametrize("config, params", SHAPES)
def test_parameter_count_follows_the_shape(config: dict[str, Any], params: int) -> None:
    assert ModelShape.from_hf_config(config).params == params


def test_a_missing_key_is_named() -> None:
    config = {k: v for k, v in LLAMA3_8B_CONFIG.items() if k != "intermediate_size"}
    with pytest.raises(ShapeError, match="intermediate_size"):
        ModelShape.from_hf_config(config)


PARTS = [
    pytest.param({}, "parameters", 4 * P + 2 * P,
                 id="ddp keeps fp32 weights and the bf16 copies autocast makes on every rank"),
    pytest.param({}, "optimizer", 8 * P, id="ddp keeps both AdamW moments on every rank"),
    pytest.param({"training": {"parallelism": {"strategy": "fsdp"}}}, "optimizer", 8 * P // 8,
                 id="fsdp shards the optimizer over the world"),
    pytest.param({"training": {"parallelism": {"strategy": "fsdp"}}}, "parameters", 4 * P // 8 + 2 * GATHERED,
                 id="fsdp keeps a shard plus two gathered bf16 blocks and the root"),
    pytest.param({"training": {"parallelism": {"strategy": "hsdp"}}, "resources": {"nodes": 4}}, "optimizer",
                 8 * P // 8, id="hsdp shards within a node only"),
    pytest.param({"training": {"parallelism": {"strategy": "fsdp", "cpuOffload": True}}}, "optimizer", 0,
                 id="cpu offload moves the optimizer to the host"),
    pytest.param({"training": {"parallelism": {"strategy": "fsdp", "cpuOffload": True}}}, "parameters",
                 2 * GATHERED, id="cpu offload leaves only the gathered working copies on the GPU"),
    pytest.param({"training": {"parallelism": {"strategy": "auto"}}, "resources": {"gpusPerNode": 1}},
                 "optimizer", 8 * P, id="auto on one GPU is a single unsharded process"),
    pytest.param({"training": {"parallelism": {"strategy": "auto"}}}, "optimizer", 8 * P // 8,
                 id="auto on eight GPUs is fsdp"),
    pytest.param({}, "reference", 0, id="no reference model without refKL or a drift suite"),
    pytest.param({"regularization": {"refKL": {"beta": 0.1}}}, "reference", 2 * P,
                 id="refKL keeps the whole bf16 base on each ddp rank"),
    pytest.param({**DRIFT, "training": {"parallelism": {"strategy": "fsdp"}}}, "reference", 2 * P // 8,
                 id="a drift suite keeps the base, sharded like the model under fsdp"),
    pytest.param({}, "logits", 4096 * 128256 * 12,
                 id="the loss keeps fp32 log-probabilities and two fp32 gradients per logit"),
    pytest.param({"regularization": {"refKL": {"beta": 0.1}}}, "logits", 4096 * 128256 * (12 + 2 + 8),
                 id="refKL adds the reference logits and two fp32 copies for the KL term"),
    pytest.param({"resources": {"gpusPerNode": 0, "nprocPerNode": 2}}, "parameters", 4 * P,
                 id="a CPU run plans fp32 without autocast copies"),
    pytest.param({"resources": {"gpusPerNode": 0, "nprocPerNode": 2},
                  "training": {"parallelism": {"strategy": "fsdp", "cpuOffload": True}}}, "optimizer", 0,
                 id="a CPU run's offloaded state is the host plan's, not counted twice"),
]


@pytest.mark.parametrize("sections, part, expected", PARTS)
def test_parts_by_layout(sections: dict[str, Any], part: str, expected: int) -> None:
    assert getattr(estimate(spec(**sections), LLAMA3_8B), part) == expected


def _acts(ac: str) -> int:
    return estimate(spec(training={"parallelism": {"strategy": "fsdp", "activationCheckpointing": ac}}),
                    LLAMA3_8B).activations


def test_checkpointing_keeps_block_inputs_and_one_block() -> None:
    per_block = 4096 * layer_bytes(LLAMA3_8B, Dtypes(compute=2, residual=2))
    none, selective, full = _acts("none"), _acts("selective"), _acts("full")
    assert none - full == 31 * per_block - 32 * 4096 * 4096 * 2
    assert selective - full == 16 * per_block - 16 * 4096 * 4096 * 2
    assert full < selective < none


def test_buffers_are_a_fixed_amount_plus_five_percent() -> None:
    plan = estimate(spec(), LLAMA3_8B)
    rest = plan.total - plan.buffers
    assert plan.buffers == 3 * GIB // 2 + int(0.05 * rest)


FSDP = {"strategy": "fsdp"}
SINGLE_GPU_FULL_AC = {"strategy": "auto", "activationCheckpointing": "full"}
FIXES = [
    pytest.param({}, {"training": {"parallelism": FSDP}}, "training.parallelism.strategy: fsdp",
                 id="replicated state that does not fit is sharded first"),
    pytest.param({"training": {"microBatchSize": 2, "parallelism": FSDP}},
                 {"training": {"microBatchSize": 2, "parallelism": {**FSDP, "activationCheckpointing": "selective"}}},
                 "training.parallelism.activationCheckpointing: selective",
                 id="sharded but too many activations tries selective checkpointing next"),
    pytest.param({"training": {"microBatchSize": 2, "parallelism": FSDP}},
                 {"training": {"microBatchSize": 2, "parallelism": {**FSDP, "activationCheckpointing": "full"}}},
                 "training.parallelism.activationCheckpointing: full",
                 id="full checkpointing when selective is not enough"),
    pytest.param({"training": {"microBatchSize": 8, "parallelism": {**FSDP, "activationCheckpointing": "full"}}},
                 {"training": {"microBatchSize": 2, "parallelism": {**FSDP, "activationCheckpointing": "full"}}},
                 "training.microBatchSize: 2, training.gradAccumulation: 4",
                 id="then the largest halved micro-batch that fits, keeping the tokens per step"),
    pytest.param({"training": {"parallelism": {**FSDP, "activationCheckpointing": "full"}}},
                 {"training": {"parallelism": {**FSDP, "activationCheckpointing": "full", "cpuOffload": True}}},
                 "training.parallelism.cpuOffload: true", id="then CPU offload"),
    pytest.param({"training": {"parallelism": SINGLE_GPU_FULL_AC}, "resources": {"gpusPerNode": 1}},
                 {"training": {"parallelism": SINGLE_GPU_FULL_AC}, "resources": {"gpusPerNode": 1, "nodes": 4}},
                 "resources.nodes: 4", id="more nodes last, doubling until the sharded state fits"),
    pytest.param({"training": {"microBatchSize": 2}},
                 {"training": {"microBatchSize": 2, "parallelism": {**FSDP, "activationCheckpointing": "full"}}},
                 "training.parallelism.strategy: fsdp, training.parallelism.activationCheckpointing: full",
                 id="when no single change fits the changes are combined in the same order"),
]


def _gpu_memory(sections: dict[str, Any], limit: int) -> dict[str, Any]:
    return {**sections, "resources": {**sections.get("resources", {}), "gpuMemory": str(limit)}}


@pytest.mark.parametrize("sections, fitting, changes", FIXES)
def test_smallest_fix(sections: dict[str, Any], fitting: dict[str, Any], changes: str) -> None:
    limit = estimate(spec(**fitting), LLAMA3_8B).total
    tight = spec(**_gpu_memory(sections, limit))
    assert not estimate(tight, LLAMA3_8B).fits(limit)
    fix = smallest_fix(tight, LLAMA3_8B)
    assert fix is not None and ", ".join(fix.changes) == changes
    assert fix.sentence() == f"set {changes} (per-GPU {format_bytes(fix.usages[0].used)} of {format_bytes(limit)})"


def test_nothing_fits_in_a_gigabyte() -> None:
    tiny_gpus = spec(resources={"gpuMemory": "1Gi"})
    message = wont_fit(tiny_gpus, LLAMA3_8B)
    assert smallest_fix(tiny_gpus, LLAMA3_8B) is None
    assert message is not None and "no change tried makes it fit" in message


def test_a_run_that_fits_has_no_message() -> None:
    assert wont_fit(spec(), TINY) is None


def test_llama_3_8b_on_eight_80gi_gpus_needs_fsdp() -> None:
    """seqLen 4096, micro-batch 1: replicated fp32 AdamW state alone (16 B × 8.03 B = 120 GiB)
    exceeds a GPU; sharded over 8 ranks, activations and the gathered working copies dominate."""
    limit = parse_quantity("80Gi")
    ddp = estimate(spec(), LLAMA3_8B)
    fsdp = estimate(spec(training={"parallelism": {"strategy": "fsdp"}}), LLAMA3_8B)
    assert not ddp.fits(limit) and fsdp.fits(limit)
    assert [p.split()[0] for p in ddp.largest()] == ["optimizer", "parameters"]
    assert [p.split()[0] for p in fsdp.largest()] == ["activations", "gradients"]
    assert 150 * GIB < ddp.total < 200 * GIB and 45 * GIB < fsdp.total < 70 * GIB
