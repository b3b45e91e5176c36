"""Every `training.parallelism` path through the real trainer (`torchrun -m cpt_trainer`, gloo on
CPU), against one fsdp run of the same spec on the same ranks.

All strategies average gradients over the same ranks' data, and activation checkpointing and
CPU offload change where tensors live, not the arithmetic, so each variant must repeat the fsdp
losses to fp32 rounding. Checkpoints do not depend on the strategy that wrote them: DCP saves
a replicated tensor once, and an fsdp run resumes from a ddp one where it left off.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from cpt_api.manifest import checkpoint_name

from tests.integration.harness import (check_checkpoint_on, events, log_tail, of, run, tiny_spec,
                                       write_config)

pytestmark = pytest.mark.slow

STEPS = 6


def spec_with(model: Path, corpora: dict[str, Path], parallelism: dict[str, Any],
              **overrides: Any) -> dict[str, Any]:
    return tiny_spec(model, corpora, budget={"steps": STEPS}, checkpoint={"every": 3, "keep": 10},
                     training={"microBatchSize": 2, "gradAccumulation": 2,
                               "parallelism": parallelism}, **overrides)


def train(tmp: Path, spec: dict[str, Any], nproc: int, **restore: Any) -> tuple[Path, dict[int, float]]:
    """Run an attempt to its budget; its config file and its loss per step."""
    config = write_config(tmp, spec, **restore)
    assert run(config, nproc=nproc) == 0, log_tail(config)
    evs = events(config)
    assert of("finished", evs)[-1].reason == "budget"
    return config, {e.step: e.loss for e in of("progress", evs)}


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), (step, got, want)


def model_bytes(checkpoint: Path) -> tuple[int, int]:
    """Bytes of the model's shard files, and of one copy of its tensors."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(checkpoint / "model").read_metadata().state_dict_metadata
    tensors = sum(math.prod(m.size) * m.properties.dtype.itemsize for m in meta.values())
    return sum(f.stat().st_size for f in (checkpoint / "model").glob("*.distcp")), tensors


@pytest.fixture(scope="module")
def fsdp_losses(tmp_path_factory, tiny_model_dir, corpora) -> dict[int, float]:
    """The reference: fsdp on 2 processes, no activation checkpointing, no offload."""
    spec = spec_with(tiny_model_dir, corpora, {"strategy": "fsdp"})
    return train(tmp_path_factory.mktemp("fsdp-on-two"), spec, nproc=2)[1]


@pytest.mark.parametrize("parallelism, logged, resume_with", [
    pytest.param({"strategy": "fsdp", "activationCheckpointing": "full"},
                 "activation checkpointing (full) on 2 of 2 blocks", None,
                 id="full activation checkpointing recomputes the same losses"),
    pytest.param({"strategy": "fsdp", "activationCheckpointing": "selective"},
                 "activation checkpointing (selective) on 1 of 2 blocks", None,
                 id="selective activation checkpointing recomputes the same losses"),
    pytest.param({"strategy": "fsdp", "cpuOffload": True}, "cpu offload on",
                 {"strategy": "fsdp", "cpuOffload": True},
                 id="cpu offload trains the same losses, saves and resumes"),
    pytest.param({"strategy": "ddp"}, "parallelism: ddp on 2 ranks", {"strategy": "fsdp"},
                 id="ddp trains the same losses and an fsdp run resumes its checkpoint"),
])
def test_a_strategy_trains_the_reference_losses(tmp_path, tiny_model_dir, corpora, fsdp_losses,
                                                parallelism, logged, resume_with):
    spec = spec_with(tiny_model_dir, corpora, parallelism)
    config, losses = train(tmp_path, spec, nproc=2)
    assert logged in (config.parent / "trainer.log").read_text()
    assert_same_losses(losses, fsdp_losses)
    step3 = tmp_path / "checkpoints" / "attempt-001" / checkpoint_name(3)
    # Replicas (ddp) are written once, like shards: one model's bytes, not one per rank.
    written, one_copy = model_bytes(step3)
    assert one_copy <= written < 1.2 * one_copy
    if resume_with is None:
        return
    resumed_spec = spec_with(tiny_model_dir, corpora, resume_with)
    resumed_config, resumed = train(tmp_path, resumed_spec, nproc=2, attempt=2,
                                    restore_from=str(step3), restore_mode="fullState")
    assert of("started", events(resumed_config))[0].step == 3
    assert_same_losses(resumed, {s: losses[s] for s in range(4, STEPS + 1)})


def test_hsdp_on_two_nodes_of_two_matches_fsdp_on_four_and_reshards_to_two(tmp_path, tiny_model_dir,
                                                                          corpora):
    resources = {"nodes": 2, "nprocPerNode": 2}
    hsdp_spec = spec_with(tiny_model_dir, corpora, {"strategy": "hsdp"}, resources=resources)
    hsdp, hsdp_losses = train(tmp_path / "hsdp", hsdp_spec, nproc=4)
    assert "parallelism: hsdp over mesh (2, 2)" in (hsdp.parent / "trainer.log").read_text()
    fsdp_spec = spec_with(tiny_model_dir, corpora, {"strategy": "fsdp"}, resources=resources)
    _, fsdp_losses = train(tmp_path / "fsdp", fsdp_spec, nproc=4)
    assert_same_losses(hsdp_losses, fsdp_losses)

    step6 = tmp_path / "hsdp" / "checkpoints" / "attempt-001" / checkpoint_name(STEPS)
    loaded = check_checkpoint_on(2, step6, tmp_path / "check.json")
    assert loaded["sharded"] and loaded["model_tensors"] > 0 and loaded["optimizer_tensors"] > 0
    assert loaded["model_mismatches"] == [] and loaded["optimizer_mismatches"] == []
