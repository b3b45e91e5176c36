"""Streamed, verified restores (`load/verified.py`) in one process: a checkpoint written by the
trainer's `Checkpointer` carries a block table; reading it back through DCP returns the saved
tensors, reads only the bytes asked for, and refuses a flipped byte in any block it reads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cpt_api.manifest import BLOCKS, MODEL_DIR, BlockTable, Lineage, Manifest, block_size_for
from cpt_trainer import checkpoint
from cpt_trainer.checkpointer import Checkpointer, Snapshot
from cpt_trainer.distributed import Dist
from cpt_trainer.errors import Refused
from cpt_trainer.load.verified import (Blocks, CheckpointSource, CorruptCheckpoint, VerifiedFile,
                                       open_blocks)

LINEAGE = Lineage(run="r", attempt=1, parent=None, base_uri="base", restore_mode="weightsOnly",
                  data_version="d", tokenizer_hash="t", config_hash="c")
ONE = Dist(0, 1, 0, torch.device("cpu"))


def blocks_of(data: bytes, size: int, tmp: Path) -> Blocks:
    (tmp / "f.bin").write_bytes(data)
    entry, digests = checkpoint.hash_blocks(str(tmp / "f.bin"), size)
    manifest = Manifest(step=1, tokens=0, created_at="", lineage=LINEAGE, files={"f.bin": entry})
    return Blocks(str(tmp), manifest, BlockTable(files={"f.bin": digests}))


@pytest.mark.parametrize("start, length", [
    pytest.param(0, 100, id="the whole file"),
    pytest.param(3, 5, id="a range inside one block"),
    pytest.param(5, 17, id="a range across three blocks"),
    pytest.param(95, 50, id="a read past the end stops at the end"),
])
def test_a_verified_file_returns_the_bytes_of_any_range(tmp_path, start, length):
    data = bytes(range(100))
    f = VerifiedFile(blocks_of(data, 7, tmp_path), "f.bin")
    f.seek(start)
    assert f.read(length) == data[start:start + length]
    assert f.tell() == min(100, start + length)


def test_a_read_fetches_only_the_blocks_it_touches(tmp_path):
    blocks = blocks_of(bytes(1000), 100, tmp_path)
    f = VerifiedFile(blocks, "f.bin")
    f.seek(250)
    f.read(100)  # bytes 250..349: blocks 2 and 3
    assert blocks.bytes_read == 200


def test_a_flipped_byte_is_refused_when_its_block_is_read(tmp_path):
    blocks = blocks_of(bytes(range(100)), 10, tmp_path)
    raw = bytearray((tmp_path / "f.bin").read_bytes())
    raw[42] ^= 0xFF
    (tmp_path / "f.bin").write_bytes(bytes(raw))
    f = VerifiedFile(blocks, "f.bin")
    assert f.read(40) == bytes(range(40))  # blocks 0-3 are intact
    with pytest.raises(CorruptCheckpoint, match="block 4 of f.bin"):
        f.read(10)


def save(tmp_path: Path) -> tuple[str, LlamaForCausalLM]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    optimizer = torch.optim.AdamW(model.parameters())
    saver = Checkpointer(str(tmp_path), ONE, keep=5, async_save=False)
    snap = Snapshot(step=1, tokens=0, train_state={}, data_state={}, lineage=LINEAGE, evals={},
                    train_loss=None, stable=True, config_json="{}",
                    write_model_files=lambda d: model.config.save_pretrained(d))
    uri = saver.save(model, optimizer, snap)
    saver.close()
    return uri, model


def test_a_checkpoint_restores_through_its_block_table(tmp_path):
    uri, model = save(tmp_path)
    manifest = checkpoint.read_manifest(uri)
    assert BLOCKS in manifest.files and checkpoint.problems_of(uri)[1] == []
    source = CheckpointSource(uri, uri, open_blocks(uri, manifest))
    fresh = LlamaForCausalLM(model.config)
    Checkpointer(str(tmp_path / "other"), ONE, keep=1).load_model(fresh, source)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    model_files = sum(e.size for rel, e in manifest.files.items() if rel.startswith(MODEL_DIR + "/"))
    assert source.bytes_read == model_files  # the part, each block once


def test_a_corrupt_shard_refuses_the_restore(tmp_path):
    uri, model = save(tmp_path)
    shard = Path(uri, MODEL_DIR, "__0_0.distcp")
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    source = CheckpointSource(uri, uri, open_blocks(uri, checkpoint.read_manifest(uri)))
    with pytest.raises(Refused, match=r"cannot restore from .* block \d+ of model/__0_0.distcp"):
        Checkpointer(str(tmp_path / "other"), ONE, keep=1).load_model(LlamaForCausalLM(model.config), source)


@pytest.mark.parametrize("size, block", [
    pytest.param(100, 64 << 10, id="a small file is one block of the smallest size"),
    pytest.param(10 << 20, 512 << 10, id="a 10 MiB file has about 32 blocks"),
    pytest.param(1 << 40, 16 << 20, id="a huge file has blocks of at most 16 MiB"),
])
def test_block_sizes_follow_the_file(size, block):
    assert block_size_for(size) == block


def test_a_block_table_that_differs_from_the_manifest_is_refused(tmp_path):
    uri, _ = save(tmp_path)
    table = Path(uri, BLOCKS)
    original = table.read_text()
    for changed in (original.replace("[", "[ ", 1)[:len(original)], original + " "):
        table.write_text(changed)
        with pytest.raises(CorruptCheckpoint, match="does not match the manifest"):
            open_blocks(uri, checkpoint.read_manifest(uri))


def test_a_checkpoint_without_a_block_table_reads_its_verified_local_copy(tmp_path):
    uri, model = save(tmp_path)
    manifest = checkpoint.read_manifest(uri)
    older = manifest.model_copy(update={"files": {k: v for k, v in manifest.files.items() if k != BLOCKS}})
    assert open_blocks(uri, older) is None
    source = CheckpointSource(uri, uri, None)
    fresh = LlamaForCausalLM(model.config)
    Checkpointer(str(tmp_path / "other"), ONE, keep=1).load_model(fresh, source)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight) and source.bytes_read == 0


def test_verified_files_are_read_only(tmp_path):
    f = VerifiedFile(blocks_of(b"abc", 2, tmp_path), "f.bin")
    assert f.readable() and f.seekable() and not f.writable()
    with pytest.raises(FileNotFoundError):
        VerifiedFile(f.blocks, "other.bin")
