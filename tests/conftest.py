"""Fixtures shared by every test layer: a tiny real model and small real corpora.

The model is a randomly initialised Llama (2 layers, hidden 64) with a byte-level BPE tokenizer
trained here on local license texts: real code paths, seconds to build, no model hub.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

LICENSES = "/usr/share/common-licenses"


def _license_texts() -> list[str]:
    texts = []
    for path in sorted(glob.glob(f"{LICENSES}/*")):
        if os.path.isfile(path):
            texts.append(Path(path).read_text(errors="replace"))
    return texts


def _python_texts(limit: int = 60) -> list[str]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size < 40_000)[:limit]
    return [p.read_text(errors="replace") for p in files]


def build_tiny_model(out: Path, vocab_size: int = 512, layers: int = 2, hidden: int = 64) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    import torch

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_license_texts() + _python_texts(20), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id,
                         pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF model directory (config, safetensors, tokenizer) of a tiny random Llama."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def corpora_in(root: Path) -> dict[str, Path]:
    """Real text on disk under `root`: `domain` (license texts, one file each) and `replay`
    (Python stdlib source as JSONL)."""
    import json

    domain = root / "domain"
    domain.mkdir(parents=True)
    for i, text in enumerate(_license_texts()):
        (domain / f"doc{i:03d}.txt").write_text(text)
    replay = root / "replay"
    replay.mkdir()
    with open(replay / "stdlib.jsonl", "w") as f:
        for text in _python_texts():
            f.write(json.dumps({"text": text}) + "\n")
    return {"domain": domain, "replay": replay}


@pytest.fixture(scope="session")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`corpora_in` a session directory."""
    return corpora_in(tmp_path_factory.mktemp("corpora"))


@pytest.fixture
def memory_object_store(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """`gs://` served by fsspec's in-memory filesystem: a stand-in object store for unit tests of
    code that accepts only object-store URIs (the e2e tests use the real S3 server)."""
    import sys

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class InMemoryObjectStore(MemoryFileSystem):
        protocol = ("gs",)

        @classmethod
        def _strip_protocol(cls, path: str) -> str:  # type: ignore[override]
            return super()._strip_protocol(path.removeprefix("gs://"))

    fsspec.register_implementation("gs", InMemoryObjectStore, clobber=True)
    yield "gs"
    sys.modules["fsspec.registry"]._registry.pop("gs", None)
