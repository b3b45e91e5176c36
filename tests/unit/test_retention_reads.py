"""Retention after a save reads the folder once, by sizes, and never re-hashes old checkpoints.

Finding the newest stable checkpoint used to verify the sha256 of every checkpoint in the folder
after each save: on a 70B run that is terabytes read back from object storage per save."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cpt_operator.api.manifest import Lineage, checkpoint_name
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
    real_digest = checkpoint.digest

    def spy(fs, path):
        hashed.append(str(path))
        return real_digest(fs, path)

    monkeypatch.setattr(checkpoint, "digest", spy)
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
