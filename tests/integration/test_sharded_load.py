"""Sharded loading on 4 gloo ranks (`sharded_load_check.py` under torchrun, a 30 s
collective timeout): a bf16 base saved as several safetensors files lands in an fp32 FSDP2 model
and a bf16 frozen reference exactly as transformers loads it whole, with the tokenizer
extension's mean-initialised rows, while each rank reads only about its share of the bytes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded-base")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out, max_shard_size="100KB")
    return out


def test_each_rank_reads_its_slices_and_the_model_is_the_whole_base(base, tmp_path):
    world = 4  # rows split unevenly (1000 + 4 grown rows of the embedding)
    out = tmp_path / "report.json"
    check = Path(__file__).with_name("sharded_load_check.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={world}", str(check), str(base), str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sharded"] and report["trained_mismatches"] == [] and report["reference_mismatches"] == []
    assert report["reference_dtype"] == "torch.bfloat16"
    for read in report["bytes_read"]:
        # each rank's rows of every tensor: a share, give or take the rounding of uneven rows
        assert read == pytest.approx([report["stored_bytes"] / world] * 2, rel=0.1)
    # every stored byte read once, over all ranks (the reference has no extension rows)
    assert sum(ref for _, ref in report["bytes_read"]) == report["stored_bytes"]
