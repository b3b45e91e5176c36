"""The real trainer on one CUDA device: bf16 compute, the GPU attention backend chosen by
`training.attention: auto` (flash varlen or flex block masks), document masks, asynchronous
DCP checkpoints and a fullState resume. Skipped where no CUDA device is visible (CI has none);
run on a GPU machine with `pytest -m gpu`."""
from __future__ import annotations

import math

import pytest
import torch

from cpt_api.manifest import checkpoint_name

from tests.integration.harness import events, log_tail, manifest_of, of, run, tiny_spec, write_config

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_training_checkpoint_and_resume_on_one_gpu(tmp_path, tiny_model_dir, corpora):
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 8},
                     packing={"seqLen": 256, "boundary": "documentMask"},
                     evaluation={"every": 4, "suites": [
                         {"name": "code", "kind": "general", "uri": f"{corpora['replay']}/stdlib.jsonl",
                          "maxSamples": 8}]},
                     checkpoint={"every": 4, "keep": 10})
    first = write_config(tmp_path, spec, attempt=1)
    assert run(first) == 0, log_tail(first)
    log = log_tail(first)
    assert "model on cuda x 1" in log and "compute bf16" in log, log
    assert "attention sdpa" not in log, log  # auto picks a document-aware GPU kernel
    straight = {e.step: e.loss for e in of("progress", events(first))}
    assert sorted(straight) == list(range(1, 9))
    assert all(loss is not None and math.isfinite(loss) for loss in straight.values()), straight
    assert straight[8] < straight[1], straight
    evaluated = of("evaluated", events(first))
    assert [e.step for e in evaluated] == [0, 4, 8]  # the base first

    step4 = tmp_path / "checkpoints" / "attempt-001" / checkpoint_name(4)
    assert manifest_of(step4)["step"] == 4
    resumed = write_config(tmp_path, spec, attempt=2, restore_from=str(step4), restore_mode="fullState")
    assert run(resumed) == 0, log_tail(resumed)
    again = {e.step: e.loss for e in of("progress", events(resumed))}
    assert sorted(again) == [5, 6, 7, 8]
    for step in again:  # bf16 kernels are deterministic for a fixed shape, not bit-exact across builds
        assert again[step] == pytest.approx(straight[step], rel=2e-2), (step, again, straight)
