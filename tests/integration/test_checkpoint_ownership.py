"""The real trainer under a run's checkpoint root: it keeps what the control plane pinned
whatever `keep` says, and it will not write into, prune or restore from another run's root."""
from __future__ import annotations

import pytest

from cpt_api import store
from cpt_api.manifest import RUN_RECORD, checkpoint_name
from cpt_trainer import checkpoint

from tests.integration.harness import log_tail, run, tiny_spec, write_config

pytestmark = pytest.mark.slow


def test_keep_one_never_deletes_a_pinned_restore_point(tmp_path, tiny_model_dir, corpora):
    root = tmp_path / "checkpoints"
    pinned = f"attempt-001/{checkpoint_name(3)}"
    # The control plane pins before it starts an attempt. Pinning a name this attempt is about
    # to write puts the pin in place before keep=1 would delete it, without racing the trainer
    # as a pin of a freshly judged last-good checkpoint would.
    # It has also judged through step 6 (as if it had seen those checkpoints), so step 6 may go.
    store.pin(str(root), [pinned], judged={"attempt-001": 6})
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 9}, checkpoint={"every": 3, "keep": 1})
    cfg = write_config(tmp_path, spec, root=root, run_uid="uid-a")
    assert run(cfg) == 0, log_tail(cfg)
    valid, _ = checkpoint.list_checkpoints(str(root / "attempt-001"))
    assert [name for name, _ in valid] == [checkpoint_name(3), checkpoint_name(9)]  # step 6 pruned
    assert {m.lineage.run_uid for _, m in valid} == {"uid-a"}


def test_keep_one_deletes_nothing_the_control_plane_has_not_judged(tmp_path, tiny_model_dir, corpora):
    """Any checkpoint may become the last good one once the control plane weighs its evaluation:
    until pinned.json says it has (`judged`), retention keeps it, whatever `keep` says."""
    root = tmp_path / "checkpoints"
    store.pin(str(root), [])  # a control plane that has seen nothing of this attempt yet
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 9}, checkpoint={"every": 3, "keep": 1})
    cfg = write_config(tmp_path, spec, root=root, run_uid="uid-a")
    assert run(cfg) == 0, log_tail(cfg)
    valid, _ = checkpoint.list_checkpoints(str(root / "attempt-001"))
    assert [name for name, _ in valid] == [checkpoint_name(3), checkpoint_name(6), checkpoint_name(9)]


def test_another_runs_root_is_neither_written_nor_restored_from(tmp_path, tiny_model_dir, corpora):
    root = tmp_path / "checkpoints"
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 3}, checkpoint={"every": 3, "keep": 1})
    first = write_config(tmp_path / "a", spec, root=root, run_uid="uid-a",
                         checkpoints=root / "attempt-001")
    assert run(first) == 0, log_tail(first)
    step3 = root / "attempt-001" / checkpoint_name(3)
    before = (step3 / "manifest.json").read_bytes()

    # Same checkpoint.uri, another run: refused (exit 2) before it clears or prunes anything.
    second = write_config(tmp_path / "b", {**spec, "budget": {"steps": 6}}, root=root, run_uid="uid-b",
                          checkpoints=root / "attempt-001")
    assert run(second) == 2
    assert "belongs to run local/t (uid uid-a)" in log_tail(second)
    assert (step3 / "manifest.json").read_bytes() == before
    assert store.owner(str(root)).uid == "uid-a" and (root / RUN_RECORD).exists()

    # Its own root, but told to restore the first run's checkpoint: refused as well.
    other = tmp_path / "other"
    third = write_config(tmp_path / "c", spec, root=other, run_uid="uid-b", checkpoints=other / "attempt-002",
                         restore_from=str(step3), restore_mode="fullState")
    assert run(third) == 2
    assert f"checkpoint.uri {root} is taken: it belongs to run local/t (uid uid-a)" in log_tail(third)

    # Its own root, and the first run's checkpoint named as its base: refused unless the spec
    # imports it; imported, it starts from those weights.
    as_base = {**spec, "baseModel": {"uri": str(step3), "format": "checkpoint"}}
    fourth = write_config(tmp_path / "d", as_base, root=other, run_uid="uid-b", checkpoints=other / "attempt-003")
    assert run(fourth) == 2
    assert f"baseModel {step3} is a checkpoint of run local/t (uid uid-a)" in log_tail(fourth)
    assert "baseModel.importCheckpoint: true" in log_tail(fourth)
    imported = {**as_base, "baseModel": {**as_base["baseModel"], "importCheckpoint": True}}
    fifth = write_config(tmp_path / "e", imported, root=other, run_uid="uid-b", checkpoints=other / "attempt-004")
    assert run(fifth) == 0, log_tail(fifth)
    assert (step3 / "manifest.json").read_bytes() == before
