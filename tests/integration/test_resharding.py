"""A sharded run killed on 4 ranks resumes on 2: its checkpoint loads exactly on the new world
size (every tensor of the model and of AdamW, gathered, equals the files) and the run
continues from the saved step with every rank's data position re-dealt.

That no document is repeated or skipped across the change is shown document by document in
tests/unit/data/test_resharding.py; here the real trainer goes through the same path."""
from __future__ import annotations

import json

import pytest

from cpt_api.manifest import checkpoint_name

from tests.integration.harness import (check_checkpoint_on, events, kill_after_checkpoint, log_tail,
                                       manifest_of, of, run, tiny_spec, write_config)

pytestmark = pytest.mark.slow


def test_fsdp_run_killed_on_four_ranks_resumes_on_two(tmp_path, tiny_model_dir, corpora):
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 40},
                     checkpoint={"every": 3, "keep": 20},
                     training={"microBatchSize": 2, "gradAccumulation": 1,
                               "parallelism": {"strategy": "fsdp"}})
    first = write_config(tmp_path, spec, attempt=1)
    step6 = kill_after_checkpoint(first, 4, tmp_path / "checkpoints" / "attempt-001", 6)
    files = set(manifest_of(step6)["files"])
    assert {f"model/__{r}_0.distcp" for r in range(4)} <= files  # every rank wrote its shard
    assert {f"data-rank{r:05d}.json" for r in range(4)} <= files

    loaded = check_checkpoint_on(2, step6, tmp_path / "check.json")
    assert loaded["sharded"] and loaded["model_tensors"] > 0 and loaded["optimizer_tensors"] > 0
    assert loaded["model_mismatches"] == [] and loaded["optimizer_mismatches"] == []

    second = write_config(tmp_path, spec, attempt=2, restore_from=str(step6),
                          restore_mode="fullState")
    assert run(second, nproc=2) == 0, log_tail(second)
    evs = events(second)
    started = of("started", evs)[0]
    assert (started.step, started.world_size) == (6, 2)
    assert [e.step for e in of("progress", evs)] == list(range(7, 41))
    assert of("finished", evs)[-1].reason == "budget"
    resumed = tmp_path / "checkpoints" / "attempt-002" / checkpoint_name(9)
    manifest = manifest_of(resumed)
    assert manifest["lineage"]["parent"] == str(step6)
    assert {f"data-rank{r:05d}.json" for r in range(2)} <= set(manifest["files"])
    # The four old ranks' token counts carried over whole: the run's curriculum position.
    trained_at_6 = 6 * 4 * 2 * 64  # steps x ranks x micro-batch x seqLen
    for rank in range(2):
        state = json.loads((resumed / f"data-rank{rank:05d}.json").read_text())
        assert (state["world_size"], state["rank"]) == (2, rank)
        assert sum(state["base"].values()) == trained_at_6
