"""The planner against a real step: a tiny random Llama, fp32 on CPU, one AdamW step.

Measured: (a) parameter, gradient and AdamW state tensor bytes exactly; (b) activations as the
storage bytes of every tensor autograd saves for backward (through saved_tensors_hooks,
deduplicated by storage, parameters excluded), and the loss's logits as the logits, the
log-probabilities the cross-entropy saves and the logits' gradient. The loss is computed as the
trainer computes it (`loop.py::_forward_losses`). Each planned part must be within 25 %.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from cpt_api.spec import CptRunSpec
from cpt_operator.policy.memory import MemoryPlan, estimate
from cpt_operator.policy.model_shape import ModelShape

SEQ, BATCH = 128, 2
CONFIG = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, vocab_size=4096, max_position_embeddings=SEQ, use_cache=False)


@dataclass
class Saved:
    """Bytes autograd saved, by where they were saved: a block index, or None outside blocks."""

    params: set[int]
    block: int | None = None
    storages: dict[int, tuple[int | None, int]] = field(default_factory=dict)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages.setdefault(storage.data_ptr(), (self.block, storage.nbytes()))
        return t

    def total(self, where: Any = ...) -> int:
        return sum(n for block, n in self.storages.values() if where is ... or block == where)


def _model(checkpointing: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(CONFIG, attn_implementation="sdpa", dtype=torch.float32)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _track_blocks(model: LlamaForCausalLM, saved: Saved) -> None:
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: setattr(saved, "block", i))
        layer.register_forward_hook(lambda *_: setattr(saved, "block", None))


def _step(model: LlamaForCausalLM) -> tuple[Saved, int, torch.optim.Optimizer]:
    """One AdamW step; returns what was saved and the logits' bytes (tensor, saved, gradient)."""
    saved = Saved(params={p.untyped_storage().data_ptr() for p in model.parameters()})
    _track_blocks(model, saved)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ))
    grads: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        raw = model(input_ids=ids).logits
        logits = raw[:, :-1].float()  # as the trainer: shift, upcast, per-token cross-entropy
        logits.register_hook(lambda g: grads.append(g.untyped_storage().nbytes()))
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    nll.sum().backward()
    optimizer.step()
    return saved, raw.untyped_storage().nbytes() + _logit_saved(saved) + sum(grads), optimizer


def _logit_saved(saved: Saved) -> int:
    """The cross-entropy's log-probabilities: the only saved tensors of the logits' size."""
    return sum(n for _, n in saved.storages.values() if n >= BATCH * (SEQ - 1) * CONFIG.vocab_size * 4)


def _plan(checkpointing: str) -> MemoryPlan:
    spec = CptRunSpec.model_validate({
        "baseModel": {"uri": "tiny"}, "data": {"sources": [{"name": "d", "role": "domain", "uri": "d"}]},
        "budget": {"steps": 1000}, "packing": {"seqLen": SEQ},
        "training": {"microBatchSize": BATCH, "parallelism": {"activationCheckpointing": checkpointing}}})
    return estimate(spec, ModelShape.from_hf_config(CONFIG.to_dict()))


def _state_bytes(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {"parameters": sum(p.nbytes for p in model.parameters()),
            "gradients": sum(p.grad.nbytes for p in model.parameters() if p.grad is not None),
            "optimizer": sum(t.nbytes for t in state)}


@pytest.fixture(scope="module")
def plain() -> tuple[LlamaForCausalLM, Saved, int, torch.optim.Optimizer]:
    model = _model(checkpointing=False)
    return (model, *_step(model))


def test_model_state_is_counted_exactly(plain: Any) -> None:
    model, _, _, optimizer = plain
    plan, measured = _plan("none"), _state_bytes(model, optimizer)
    assert {k: getattr(plan, k) for k in measured} == pytest.approx(measured, rel=1e-3)


def _ratio(planned: int, measured: int) -> float:
    ratio = planned / measured
    print(f"planned {planned:,} / measured {measured:,} = {ratio:.3f}")
    return ratio


def test_activations_and_logits_without_checkpointing(plain: Any) -> None:
    _, saved, logits, _ = plain
    plan = _plan("none")
    assert 0.75 < _ratio(plan.activations, saved.total() - _logit_saved(saved)) < 1.25
    assert 0.75 < _ratio(plan.logits, logits) < 1.25


def test_activations_with_full_checkpointing(plain: Any) -> None:
    """Checkpointed blocks save only their inputs; the backward pass recomputes one block at a
    time, so one block's activations (as measured without checkpointing) come back."""
    _, without, _, _ = plain
    one_block = max(without.total(i) for i in range(CONFIG.num_hidden_layers))
    saved, _, _ = _step(_model(checkpointing=True))
    measured = saved.total() - _logit_saved(saved) + one_block
    assert 0.75 < _ratio(_plan("full").activations, measured) < 1.25
