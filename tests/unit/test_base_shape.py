"""Reading a base's shape for the planner: config.json (local or any fsspec URL), GGUF headers."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import fsspec
import numpy as np
import pytest
from gguf import GGUFWriter

from cpt_api.spec import BaseModelSpec
from cpt_operator.base_shape import ShapeUnavailable, read_shape
from cpt_operator.gguf_header import read_header
from cpt_operator.policy.model_shape import ModelShape
from tests.unit.policy.memory_cases import LLAMA3_8B, LLAMA3_8B_CONFIG

SMALL = ModelShape(hidden=64, layers=3, heads=4, kv_heads=2, head_dim=16, intermediate=176, vocab=300, tied=False)


def write_gguf(path: Path, *, arch: str = "llama", head: bool = True, big_tensor_mib: int = 0) -> Path:
    """A GGUF file with SMALL's header keys, a 300-token vocabulary and a few tensors."""
    w = GGUFWriter(path, arch)
    w.add_block_count(SMALL.layers)
    w.add_embedding_length(SMALL.hidden)
    w.add_feed_forward_length(SMALL.intermediate)
    w.add_head_count(SMALL.heads)
    w.add_head_count_kv(SMALL.kv_heads)
    w.add_token_list([f"tok{i}" for i in range(SMALL.vocab)])
    w.add_tensor("token_embd.weight", np.zeros((SMALL.vocab, SMALL.hidden), dtype=np.float32))
    if head:
        w.add_tensor("output.weight", np.zeros((SMALL.vocab, SMALL.hidden), dtype=np.float32))
    if big_tensor_mib:
        w.add_tensor("blk.0.ffn_up.weight", np.zeros((big_tensor_mib << 18,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_config_json_of_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    assert read_shape(BaseModelSpec(uri=str(tmp_path))) == LLAMA3_8B


def test_config_json_at_the_top_of_a_checkpoint_through_an_fsspec_url() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/ckpt/run/step-00000100/config.json", json.dumps(LLAMA3_8B_CONFIG).encode())
    # memory:// is no scheme a spec accepts: construct the model without validation
    base = BaseModelSpec.model_construct(uri="memory://ckpt/run/step-00000100/", format="checkpoint")
    assert read_shape(base) == LLAMA3_8B


@pytest.mark.parametrize("arch, head, tied", [
    pytest.param("llama", True, False, id="a llama GGUF with its own output head"),
    pytest.param("qwen2", False, True, id="another architecture prefix, head tied to the embedding"),
])
def test_gguf_header(tmp_path: Path, arch: str, head: bool, tied: bool) -> None:
    path = write_gguf(tmp_path / "base.gguf", arch=arch, head=head)
    shape = read_shape(BaseModelSpec(uri=str(path), format="gguf"))
    assert shape == replace(SMALL, tied=tied)


def test_the_gguf_reader_stops_before_the_tensor_data(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "big.gguf", big_tensor_mib=16)
    with path.open("rb") as f:
        header = read_header(f)
        consumed = f.tell()
    assert header.tensors == ["token_embd.weight", "output.weight", "blk.0.ffn_up.weight"]
    assert consumed < 64 << 10 < path.stat().st_size - (16 << 20)


@pytest.mark.parametrize("make, needle", [
    pytest.param(lambda d: BaseModelSpec(uri=str(d / "absent")), "absent/config.json",
                 id="a missing config.json names the path it looked for"),
    pytest.param(lambda d: BaseModelSpec(uri=str(_file(d / "x.gguf", b"GGML0000")), format="gguf"), "GGUF magic",
                 id="a file that is not GGUF says so"),
    pytest.param(lambda d: BaseModelSpec(uri=str(_file(d / "c" / "config.json", b'{"hidden_size": 8}').parent)),
                 "num_attention_heads", id="a config.json without the shape keys names the first missing one"),
])
def test_unreadable_bases_say_why(tmp_path: Path, make, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ShapeUnavailable, match=needle):
        read_shape(make(tmp_path))


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
