"""`refkl.replay_kl` on a tiny Llama: the KL over replay tokens computed on the replay windows
alone equals the formula over the whole micro-batch, and a micro-batch without replay enters
the reference only when the reference is a collective (sharded)."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from cpt_trainer.data import Batch
from cpt_trainer.refkl import replay_kl

REPLAY = 1
T = 16


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, use_cache=False)).eval()


def batch(sources: list[int]) -> Batch:
    """One window per source id; two documents in each, the first token of each unlabelled."""
    ids = torch.randint(0, 128, (len(sources), T), generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(6), torch.arange(T - 6)]).repeat(len(sources), 1)
    labels = ids.masked_fill(positions == 0, -100)
    source_ids = torch.tensor(sources).unsqueeze(1).expand(-1, T).clone()
    return Batch(ids, labels, positions, source_ids, int((labels != -100).sum()))


def calls_of(module: torch.nn.Module) -> list[torch.Size]:
    seen: list[torch.Size] = []
    module.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"].shape),
                                     with_kwargs=True)
    return seen


@pytest.mark.parametrize("flatten", [
    pytest.param(False, id="windows as rows"),
    pytest.param(True, id="windows laid end to end in one row"),
])
def test_the_replay_windows_alone_give_the_whole_batch_kl(flatten):
    model, reference = tiny_llama(0), tiny_llama(1)
    b = batch([0, REPLAY, 0, REPLAY])
    replay = (b.source_ids[:, 1:] == REPLAY) & (b.labels[:, 1:] != -100)
    logits = model(**b.model_inputs()).logits[:, :-1]
    seen = calls_of(reference)

    got = replay_kl(reference, b, logits, replay, flatten=flatten, collective=False,
                    autocast=contextlib.nullcontext())
    assert seen == [torch.Size([1, 2 * T]) if flatten else torch.Size([2, T])]  # replay rows only

    with torch.no_grad():
        ref_logp = F.log_softmax(reference(**b.model_inputs()).logits[:, :-1][replay], dim=-1)
    logp = F.log_softmax(logits[replay], dim=-1)
    want = (ref_logp.exp() * (ref_logp - logp)).sum()
    assert got is not None and got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("collective, calls", [
    pytest.param(True, [torch.Size([1, 1])], id="a sharded reference still runs, on one token"),
    pytest.param(False, [], id="a replicated reference is not run"),
])
def test_a_micro_batch_without_replay_gives_no_term(collective, calls):
    model, reference = tiny_llama(0), tiny_llama(1)
    b = batch([0, 0])
    replay = (b.source_ids[:, 1:] == REPLAY) & (b.labels[:, 1:] != -100)
    seen = calls_of(reference)
    logits = model(**b.model_inputs()).logits[:, :-1]
    assert replay_kl(reference, b, logits, replay, flatten=False, collective=collective,
                     autocast=contextlib.nullcontext()) is None
    assert seen == calls
