"""`parallel.py` on a tiny Llama in one process: which blocks activation checkpointing wraps,
that the wrapping survives FSDP2 sharding (under a one-rank gloo group) and really keeps fewer
activations, and the refusal of a model whose decoder blocks cannot be found."""
from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import LlamaConfig, LlamaForCausalLM

from cpt_api.spec import ActivationCheckpointing, ParallelismSpec, Sharding
from cpt_trainer.distributed import Dist
from cpt_trainer.errors import Refused
from cpt_trainer.parallel import decoder_blocks, parallelize

LAYERS = 4
ONE = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=LAYERS, num_attention_heads=4,
                                        num_key_value_heads=2, use_cache=False))


def wrapped(model: nn.Module) -> list[int]:
    """Indices of the decoder layers that sit inside a checkpoint wrapper."""
    layers = model.model.layers  # type: ignore[union-attr]
    return [i for i, m in enumerate(layers) if type(m).__name__ == "CheckpointWrapper"]


def saved_activation_bytes(model: nn.Module) -> int:
    """Bytes autograd keeps for backward during one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(storages.values())


@pytest.fixture(scope="module")
def one_rank_group() -> Iterator[None]:
    """A one-process gloo group, enough for FSDP2 to shard over a one-rank mesh."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("mode, expected", [
    pytest.param(ActivationCheckpointing.none, [], id="none wraps no block"),
    pytest.param(ActivationCheckpointing.full, [0, 1, 2, 3], id="full wraps every block"),
    pytest.param(ActivationCheckpointing.selective, [0, 2], id="selective wraps every other block"),
])
def test_activation_checkpointing_wraps_blocks(mode, expected):
    model = tiny_llama()
    parallelize(model, ParallelismSpec(activation_checkpointing=mode), ONE, procs_per_node=1,
                compute_dtype=None)
    assert wrapped(model) == expected
    assert len(decoder_blocks(model)) == LAYERS  # the blocks are still found inside wrappers


def test_checkpointed_blocks_keep_fewer_activations_and_compute_the_same_loss():
    plain, full, selective = tiny_llama(), tiny_llama(), tiny_llama()
    for model, mode in ((full, ActivationCheckpointing.full),
                        (selective, ActivationCheckpointing.selective)):
        parallelize(model, ParallelismSpec(activation_checkpointing=mode), ONE, procs_per_node=1,
                    compute_dtype=None)
    kept = {name: saved_activation_bytes(m) for name, m in
            (("none", plain), ("selective", selective), ("full", full))}
    assert kept["full"] < kept["selective"] < kept["none"], kept
    for a, b in zip(plain.parameters(), full.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_sharding_goes_outside_the_checkpoint_wrapper(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh

    from cpt_trainer.parallel import _checkpoint_blocks, shard

    model = tiny_llama()
    _checkpoint_blocks(model, ActivationCheckpointing.full)
    shard(model, init_device_mesh("cpu", (1,), mesh_dim_names=("shard",)))
    layers = model.model.layers
    assert all(isinstance(m, FSDPModule) and type(m).__name__.endswith("CheckpointWrapper")
               for m in layers), [type(m).__name__ for m in layers]
    reference = tiny_llama()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss  # through both wrappers, forward and back
    loss.backward()
    torch.testing.assert_close(loss, reference(input_ids=ids, labels=ids).loss)
    assert all(p.grad is not None for p in model.parameters())


def test_a_model_without_known_blocks_is_refused_with_its_class_named():
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    with pytest.raises(Refused, match=r"decoder blocks of Opaque .*_no_split_modules"):
        decoder_blocks(Opaque())
    with pytest.raises(Refused, match="Opaque"):
        parallelize(Opaque(), ParallelismSpec(activation_checkpointing=ActivationCheckpointing.full),
                    ONE, procs_per_node=1, compute_dtype=None)


def test_strategy_auto_is_fsdp_on_several_ranks_and_plain_on_one():
    from cpt_trainer.parallel import resolve_strategy

    assert resolve_strategy(ParallelismSpec(), 1) is None
    assert resolve_strategy(ParallelismSpec(), 2) == Sharding.fsdp
    assert resolve_strategy(ParallelismSpec(strategy=Sharding.ddp), 2) == Sharding.ddp
