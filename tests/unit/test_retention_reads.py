"""Retention after a save reads the folder once, by sizes, and never re-hashes old checkpoints;
its errors never undo a committed save; a failed upload leaves no staging copy on the node.

Finding the newest stable checkpoint used to verify the sha256 of every checkpoint in the folder
after each save: on a 70B run that is terabytes read back from object storage per save."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cpt_api import store
from cpt_api.manifest import Lineage, checkpoint_name
from cpt_trainer import checkpoint
from cpt_trainer.checkpointer import Checkpointer, Snapshot
from cpt_trainer.distributed import Dist


def tiny() -> tuple[LlamaConfig, LlamaForCausalLM, torch.optim.Optimizer]:
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    return config, model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_saving_hashes_only_the_new_checkpoint_and_keeps_the_newest_stable(tmp_path, monkeypatch):
    hashed: list[str] = []
    real_digest = store.file_digest

    def spy(fs, path):
        hashed.append(str(path))
        return real_digest(fs, path)

    monkeypatch.setattr(store, "file_digest", spy)
    config, model, optimizer = tiny()
    lineage = Lineage(run="r", attempt=1, parent=None, base_uri="random", restore_mode="weightsOnly",
                      data_version="d", tokenizer_hash="t", config_hash="c")
    saver = Checkpointer(str(tmp_path), Dist(0, 1, 0, torch.device("cpu")), keep=1, async_save=False)
    for step in (1, 2, 3, 4):
        hashed.clear()
        saver.save(model, optimizer, Snapshot(
            step=step, tokens=0, train_state={"step": step}, data_state={}, lineage=lineage, evals={},
            train_loss=None, stable=step == 1, config_json="{}", write_model_files=config.save_pretrained))
        old = [p for p in hashed if f"/{checkpoint_name(step)}/" not in p]
        assert old == [], f"save {step} re-hashed older checkpoints: {old}"
    saver.close()
    kept = sorted(name for name, _ in checkpoint.list_checkpoints(str(tmp_path))[0])
    # keep=1 keeps the newest; the newest stable one (anomaly recovery's target) survives too
    assert kept == [checkpoint_name(1), checkpoint_name(4)]


def snapshot(step: int, config: LlamaConfig) -> Snapshot:
    lineage = Lineage(run="r", attempt=1, parent=None, base_uri="random", restore_mode="weightsOnly",
                      data_version="d", tokenizer_hash="t", config_hash="c")
    return Snapshot(step=step, tokens=0, train_state={"step": step}, data_state={}, lineage=lineage, evals={},
                    train_loss=None, stable=True, config_json="{}", write_model_files=config.save_pretrained)


def test_a_retention_error_keeps_the_save_is_retried_and_reported(tmp_path, monkeypatch):
    import cpt_trainer.checkpointer as checkpointer

    monkeypatch.setattr(checkpointer, "RETENTION_WAIT_S", 0.0)
    real_prune, calls = checkpoint.prune, []

    def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) <= 3:  # the store refuses every try of the second save
            raise PermissionError(13, "Access Denied")
        return real_prune(*args, **kwargs)

    config, model, optimizer = tiny()
    saver = Checkpointer(str(tmp_path), Dist(0, 1, 0, torch.device("cpu")), keep=1, async_save=False)
    saver.save(model, optimizer, snapshot(1, config))
    monkeypatch.setattr(checkpoint, "prune", flaky)
    saver.save(model, optimizer, snapshot(2, config))
    [first, second] = saver.completed()
    assert first.retention_error is None and len(calls) == 3
    assert second.retention_error and "retention after step-00000002 failed" in second.retention_error
    assert checkpoint.problems_of(second.uri)[1] == []  # saved all the same
    saver.save(model, optimizer, snapshot(3, config))  # the next save prunes what was left
    saver.close()
    assert [name for name, _ in checkpoint.list_checkpoints(str(tmp_path))[0]] == [checkpoint_name(3)]


def test_a_pins_file_read_while_it_is_replaced_does_not_fail_the_save(tmp_path, monkeypatch):
    """An S3 server without atomic overwrites may serve the control plane's pins file half
    replaced: botocore raises its checksum error (no OSError). Retention tries again."""
    from botocore.exceptions import FlexibleChecksumError

    import cpt_trainer.checkpointer as checkpointer
    from cpt_api import store

    monkeypatch.setattr(checkpointer, "RETENTION_WAIT_S", 0.0)
    real_pins, reads = store.pins, []

    def mid_replace(root):
        reads.append(root)
        if len(reads) == 1:
            raise FlexibleChecksumError(error_msg="Expected checksum ijshNQ== did not match calculated checksum")
        return real_pins(root)

    config, model, optimizer = tiny()
    saver = Checkpointer(str(tmp_path / "attempt-001"), Dist(0, 1, 0, torch.device("cpu")), keep=1,
                         async_save=False, root=str(tmp_path))
    monkeypatch.setattr(store, "pins", mid_replace)
    saver.save(model, optimizer, snapshot(1, config))
    saver.close()
    [saved] = saver.completed()
    assert saved.retention_error is None and len(reads) == 2


def test_a_failed_upload_leaves_no_staging_copy_behind(tmp_path, monkeypatch, memory_object_store):
    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def recorded(*args, **kwargs):
        made.append(real_mkdtemp(*args, dir=tmp_path, **{k: v for k, v in kwargs.items() if k != "dir"}))
        return made[-1]

    def upload_fails(*_args, **_kwargs):
        raise OSError("connection reset during upload")

    monkeypatch.setattr(tempfile, "mkdtemp", recorded)
    monkeypatch.setattr(checkpoint, "seal", upload_fails)
    config, model, optimizer = tiny()
    saver = Checkpointer(f"{memory_object_store}://ckpt-{tmp_path.name}/attempt-001",
                         Dist(0, 1, 0, torch.device("cpu")), keep=1, async_save=False)
    with pytest.raises(OSError, match="connection reset"):
        saver.save(model, optimizer, snapshot(1, config))
    assert made and not any(os.path.exists(path) for path in made)
