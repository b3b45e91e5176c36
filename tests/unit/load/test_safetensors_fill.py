"""`load/safetensors.py` and `load/fill.py` in one process: a model built on the meta device and
filled from an HF safetensors directory (sharded into several files, in another dtype) equals
what transformers loads, and what does not fit the model is refused with its reason."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from cpt_trainer.errors import Refused
from cpt_trainer.load import safetensors
from cpt_trainer.load.fill import fill
from cpt_trainer.load.safetensors import Index
from cpt_trainer.model import materialize, skeleton


def tiny(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, tie_word_embeddings=tied))


@pytest.fixture(scope="module", params=[True, False], ids=["tied head", "untied head"])
def saved(request, tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    """A tiny Llama saved in bf16, sharded into several files, and the model transformers loads
    back from them (the reference)."""
    out = tmp_path_factory.mktemp("base")
    tiny(request.param).to(torch.bfloat16).save_pretrained(out, max_shard_size="20KB")
    assert len(list(out.glob("*.safetensors"))) > 2
    return out, AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def filled(directory: Path, dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, Index]:
    model = skeleton(str(directory), dtype=dtype)
    materialize(model, "cpu")
    index = Index(str(directory))
    fill(model, index)
    return model, index  # type: ignore[return-value]


def test_a_skeleton_filled_from_sharded_files_equals_the_model_transformers_loads(saved):
    directory, reference = saved
    model, index = filled(directory)
    want = reference.state_dict()
    assert model.state_dict().keys() == want.keys()
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, want[name]), name
    tensor_bytes = sum(s.end - s.start for s in index.tensors.values())
    assert index.bytes_read == tensor_bytes  # each stored tensor read once, tied or not


def test_pieces_bound_the_read_buffer_and_give_the_same_weights(saved, monkeypatch):
    directory, reference = saved
    monkeypatch.setattr(safetensors, "PIECE_BYTES", 100)  # a few rows a piece
    model, _ = filled(directory)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name


def test_the_files_dtype_is_read_straight_into_a_model_of_the_same_dtype(saved):
    directory, reference = saved
    model, _ = filled(directory, dtype=torch.bfloat16)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name].to(torch.bfloat16)), name


def test_rows_beyond_the_base_are_left_to_the_caller_only_where_allowed(saved):
    directory, reference = saved
    model = skeleton(str(directory))
    model.resize_token_embeddings(310, mean_resizing=False)
    materialize(model, "cpu")
    with pytest.raises(Refused, match="310, 32"):
        fill(model, Index(str(directory)))
    names = [n for n in model.state_dict() if n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    fill(model, Index(str(directory)), grown=names)
    embed = model.get_input_embeddings().weight
    assert torch.equal(embed[:300], reference.get_input_embeddings().weight)


def test_a_base_missing_a_parameter_is_refused_naming_it(tmp_path, saved):
    directory, _ = saved
    other = LlamaConfig.from_pretrained(directory)
    other.num_hidden_layers = 3  # the files hold two
    other.save_pretrained(tmp_path)
    for f in directory.glob("*.safetensors"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(Refused, match=r"no weights for \d+ parameters .*layers\.2\."):
        filled(tmp_path)


def test_a_truncated_file_is_refused_before_anything_is_read(tmp_path, saved):
    directory, _ = saved
    for f in directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    victim = sorted(tmp_path.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(Refused, match="truncated or foreign"):
        Index(str(tmp_path))


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(Refused, match="not a safetensors file"):
        Index(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").write_text(json.dumps({}))
    with pytest.raises(Refused, match="no .safetensors files"):
        Index(str(tmp_path))
