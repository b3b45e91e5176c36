"""Data-pipeline throughput (read + mixture + tokenise + pack) against HF `datasets`, one core.

Both sides turn the same files into the same number of training tokens with the same
tokenizer, each timed from the files on disk to packed [seqLen] rows:
- ours: `DataPipeline` construction (listing, hashing, reading, curation off) and
  `next_batch` until one epoch's worth of tokens has been packed, with the 80/20 mixture and
  document-boundary packing (position ids, loss mask);
- baseline: the run_clm recipe, `load_dataset` of the same files, `map(tokenize, batched)`
  appending EOS, then `map(group_texts, batched)` into seqLen blocks with labels.
The process is pinned to one CPU and tokenizers / torch use one thread, as the issue asks.
Rounds alternate between the two; the figures are medians. It also prints the pipeline's
throughput as a multiple of what one training process consumes (an estimate: 6·N FLOPs per
token at a stated MFU on an H100, the same rule as the trainer's MFU metric).

    python bench/bench_data.py                 # writes bench/results/data.json
"""
from __future__ import annotations

import os

# One core, set before the Rust / OpenMP thread pools start.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cpt_api.trainer_config import TrainerConfig  # noqa: E402
from cpt_trainer.data import DataPipeline  # noqa: E402

H100_BF16_PEAK = 989e12
"""Dense bf16 FLOP/s of an H100 SXM."""


def write_corpus(root: Path, stdlib_files: int) -> dict[str, list[str]]:
    """License texts as text files (domain) and stdlib source as JSONL (replay)."""
    (root / "domain").mkdir(parents=True)
    (root / "replay").mkdir()
    domain = [Path(p).read_text(errors="replace")
              for p in sorted(glob.glob("/usr/share/common-licenses/*")) if Path(p).is_file()]
    for i, text in enumerate(domain):
        (root / "domain" / f"{i:03d}.txt").write_text(text)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    replay = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:stdlib_files]]
    with open(root / "replay" / "code.jsonl", "w") as f:
        for text in replay:
            f.write(json.dumps({"text": text}) + "\n")
    return {"domain": domain, "replay": replay}


def train_tokenizer(texts: list[str], out: Path, vocab: int):
    """A byte-level BPE of a realistic vocabulary size, trained here (no model hub offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def config(root: Path, seq_len: int) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "run": "bench", "runDir": str(root / "run"), "checkpointUri": str(root / "ckpt"),
        "spec": {
            "baseModel": {"uri": "unused"},
            "data": {"sources": [
                {"name": "domain", "role": "domain", "uri": str(root / "domain" / "*.txt"),
                 "weight": 0.8},
                {"name": "replay", "role": "replay", "uri": str(root / "replay" / "code.jsonl"),
                 "format": "jsonl", "weight": 0.2}],
                # The baseline does no curation; neither do we here, to compare like with like.
                "curation": {"dedupe": "none", "minChars": 0, "maxNonPrintable": 1.0,
                             "maxRepeatedLineRatio": 1.0, "decontaminate": False}},
            "packing": {"seqLen": seq_len, "boundary": "documentMask"},
            "budget": {"steps": 1}, "schedule": {"warmupSteps": 0},
        },
    })


def run_pipeline(root: Path, tokenizer, seq_len: int, tokens: int, batch: int) -> float:
    """Seconds from the files to `tokens` packed tokens (in this process: one core)."""
    start = time.perf_counter()
    pipe = DataPipeline(config(root, seq_len), tokenizer, 0, 1, workers=0)
    while pipe.tokens_seen < tokens:
        pipe.next_batch(batch)
    return time.perf_counter() - start


def run_datasets(root: Path, tokenizer, seq_len: int) -> tuple[float, int]:
    """Seconds and packed tokens of the run_clm recipe over the same files."""
    from datasets import concatenate_datasets, load_dataset

    eos = tokenizer.eos_token_id

    def tokenize(examples):
        ids = tokenizer(examples["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    def group_texts(examples):
        flat = [t for ids in examples["input_ids"] for t in ids]
        usable = len(flat) // seq_len * seq_len
        blocks = [flat[i:i + seq_len] for i in range(0, usable, seq_len)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    start = time.perf_counter()
    parts = [load_dataset("text", data_files=sorted(glob.glob(str(root / "domain" / "*.txt"))),
                          sample_by="document", split="train", keep_in_memory=True),
             load_dataset("json", data_files=str(root / "replay" / "code.jsonl"),
                          split="train", keep_in_memory=True)]
    raw = concatenate_datasets(parts)
    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names,
                        keep_in_memory=True)
    packed = tokenized.map(group_texts, batched=True, batch_size=1000, keep_in_memory=True)
    seconds = time.perf_counter() - start
    return seconds, len(packed) * seq_len


def training_consumption(params: float, mfu: float) -> float:
    """Tokens/s one H100 training process eats at `mfu` (6·N FLOPs per token)."""
    return mfu * H100_BF16_PEAK / (6 * params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--stdlib-files", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--params", type=float, default=135e6,
                        help="model size for the consumption estimate (SmolLM2-135M)")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data.json"))
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = write_corpus(root, args.stdlib_files)
        tokenizer = train_tokenizer(texts["domain"] + texts["replay"], root / "tok", args.vocab)
        ours, theirs, tokens = [], [], 0
        for _ in range(args.rounds):
            seconds, tokens = run_datasets(root, tokenizer, args.seq_len)
            theirs.append(tokens / seconds)
            ours.append(tokens / run_pipeline(root, tokenizer, args.seq_len, tokens, args.batch))
        chars = sum(len(t) for group in texts.values() for t in group)

    ours_tps, theirs_tps = statistics.median(ours), statistics.median(theirs)
    consumption = training_consumption(args.params, args.mfu)
    result = {
        "benchmark": "data pipeline: read + mixture + tokenise + pack, one CPU core",
        "corpus": {"characters": chars, "packed_tokens": tokens, "seq_len": args.seq_len,
                   "tokenizer": f"byte-level BPE, vocab {args.vocab}"},
        "pipeline_tokens_per_s": round(ours_tps),
        "datasets_map_group_texts_tokens_per_s": round(theirs_tps),
        "ratio_vs_datasets": round(ours_tps / theirs_tps, 3),
        "training_consumption_tokens_per_s": round(consumption),
        "training_consumption_basis": f"{args.params:.3g} params, 6N FLOPs/token, "
                                      f"{args.mfu:.0%} MFU of H100 bf16 peak (estimate)",
        "ratio_vs_training_consumption": round(ours_tps / consumption, 3),
        "rounds": args.rounds,
        "samples_tokens_per_s": {"pipeline": [round(x) for x in ours],
                                 "datasets": [round(x) for x in theirs]},
        "host": {"machine": platform.machine(), "python": platform.python_version(),
                 "cpu": platform.processor() or "unknown"},
    }
    print(f"pipeline  {ours_tps:12,.0f} tokens/s (one core)")
    print(f"datasets  {theirs_tps:12,.0f} tokens/s (map + group_texts, one core)")
    print(f"ratio     {ours_tps / theirs_tps:12.2f}  (target >= 1.0)")
    print(f"training  {consumption:12,.0f} tokens/s consumed by one H100 process "
          f"({result['training_consumption_basis']})")
    print(f"headroom  {ours_tps / consumption:12.2f}x per data-loading core")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
