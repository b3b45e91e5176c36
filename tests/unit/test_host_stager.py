"""Host staging survives torch releases whose DCP stager is single-use.

torch 2.11 (and 2.13 builds) close `DefaultStager`'s inner stager after every stage, which
empties its copy table; the trainer's second checkpoint then failed on a GPU with
`KeyError: <class 'type'>`. The pinned torch does not do this, so the tests below make the real
`DefaultStager` behave as those releases do (close after staging) and check that two saves in a
row work, through `HostStager` and through the real `Checkpointer`."""
from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from transformers import LlamaConfig, LlamaForCausalLM

from cpt_api.manifest import Lineage, checkpoint_name
from cpt_trainer.checkpointer import Checkpointer, HostStager, Snapshot
from cpt_trainer.distributed import Dist


@pytest.fixture
def single_use_stager(monkeypatch):
    """DefaultStager as torch 2.11 ships it: the inner stager is closed after each stage."""
    original = DefaultStager._stage

    def stage_then_close(self, state_dict, **kwargs):
        staged = original(self, state_dict, **kwargs)
        self._state_dict_stager.close()
        return staged

    monkeypatch.setattr(DefaultStager, "_stage", stage_then_close)


def state() -> dict:
    return {"model": {"w": torch.arange(6.0).view(2, 3)},
            "optimizer": {"state": {"w": {"step": torch.tensor(3.0)}},
                          "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": ["w"]}]}}


def test_the_emulated_release_breaks_a_reused_stager(single_use_stager):
    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                          use_async_staging=False, use_non_blocking_copy=False))
    stager.stage(state())
    with pytest.raises(KeyError):
        stager.stage(state())


def test_host_stager_stages_again_after_the_release_closed_it(single_use_stager):
    host = HostStager(pinned=False)
    for round_ in (1, 2, 3):
        staged = host.stage(state())
        assert torch.equal(staged["model"]["w"], torch.arange(6.0).view(2, 3))
        assert staged["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
        assert host.renewed == round_


def test_host_stager_keeps_its_buffers_where_torch_keeps_the_stager():
    host = HostStager(pinned=False)
    host.stage(state())
    host.stage(state())
    assert host.renewed == 0


def test_checkpointer_saves_twice_on_a_single_use_release(single_use_stager, tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randint(0, 64, (1, 8)), labels=torch.randint(0, 64, (1, 8))).loss.backward()
    optimizer.step()
    lineage = Lineage(run="r", attempt=1, parent=None, base_uri="random", restore_mode="weightsOnly",
                      data_version="d", tokenizer_hash="t", config_hash="c")
    saver = Checkpointer(str(tmp_path), Dist(0, 1, 0, torch.device("cpu")), keep=5, async_save=True)
    for step in (1, 2):
        saver.save(model, optimizer, Snapshot(
            step=step, tokens=0, train_state={"step": step}, data_state={}, lineage=lineage, evals={},
            train_loss=None, stable=True, config_json="{}", write_model_files=config.save_pretrained))
    saver.close()
    assert [s.step for s in saver.completed()] == [1, 2]
    for step in (1, 2):
        manifest = json.loads((tmp_path / checkpoint_name(step) / "manifest.json").read_text())
        assert manifest["step"] == step
