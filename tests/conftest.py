"""Fixtures shared by every test layer: a tiny real model and small real corpora.

The model is a randomly initialised Llama (2 layers, hidden 64) with a byte-level BPE tokenizer
trained here on local license texts: real code paths, seconds to build, no model hub.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

# One torch thread per process, in this process and every process a test starts (set before
# torch is imported, and inherited). The suite runs two pytest processes side by side
# (scripts/test.sh), each starting trainers, on machines of a few cores: torch's default of a
# thread per core then has every op wait at a barrier for threads the scheduler has parked. On
# the 2-core CI machine the demo's judges took 368 s with two threads and 62 s with one, the
# same results. Set OMP_NUM_THREADS yourself to override it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def write_benchmark_tasks(root: Path) -> Path:
    """A directory of lm-eval task YAMLs with their data, as a team keeps a private benchmark:
    `sums` (multiple choice: acc, acc_norm; 24 questions) and `echo` (generation: exact_match)."""
    import json
    import random

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    questions = []
    for _ in range(24):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        choices = [str(a + b), str(a + b + 1), str(a + b - 1), str(a * b + 10)]
        rng.shuffle(choices)
        questions.append({"question": f"What is {a} plus {b}?", "choices": choices,
                          "answer": choices.index(str(a + b))})
    (root / "sums.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "sums.yaml").write_text(f"""task: sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "sums.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    words = ["license", "software", "warranty", "copyright", "permission", "notice"]
    (root / "echo.jsonl").write_text("".join(json.dumps({"word": w}) + "\n" for w in words))
    (root / "echo.yaml").write_text(f"""task: echo
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "echo.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "Repeat the word: {{{{word}}}}\\nWord:"
doc_to_target: " {{{{word}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return root


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


# The test cluster's fixtures, registered here once for tests/e2e and tests/faults alike
# (tests/e2e/fixtures.py says why); each starts only when a test asks for it.
from tests.e2e.fixtures import (alertmanager, base_image, fault_free_loop, helm_bin, host_prometheus,  # noqa: E402,F401
                                host_s3, kube_cluster, namespace, operator, operator_image, prometheus,
                                real_node, s3_bucket, s3_server, trainer_image)
