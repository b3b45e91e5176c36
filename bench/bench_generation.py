"""Greedy generation for the behaviour, safety and drift suites: with and without the KV cache.

  python bench/bench_generation.py [--model PATH.gguf] [--max-new-tokens 40] [--out FILE]

Models are loaded for training with `config.use_cache = False` (packed batches need the
per-document mask that a cache would drop); generation asks for the cache itself. This measures
what that is worth on the demo model and checks that both ways produce the same tokens.
Both variants run interleaved in this one process; the figure is the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cpt_trainer.evals import generation
from cpt_trainer.model import load_model

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CPT_CACHE_DIR", Path.home() / ".cache/cpt-operator"))


def prompts(tokenizer: PreTrainedTokenizerBase, n: int, max_new_tokens: int) -> list[list[int]]:
    lines = (ROOT / "examples/demo/json-prompts.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()][:n]
    return generation.prompt_rows(tokenizer, texts, seq_len=256, max_new_tokens=max_new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(CACHE / "demo-model/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench/results/generation.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    path = Path(args.model)
    model = load_model(str(path.parent), gguf_file=path.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    rows = prompts(tokenizer, args.prompts, args.max_new_tokens)
    times: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, list[list[int]]] = {}
    for _ in range(args.rounds):
        for cache in (False, True):
            generation.KV_CACHE = cache
            began = time.perf_counter()
            with torch.no_grad():
                outputs[cache] = generation.greedy(model, tokenizer, rows, max_new_tokens=args.max_new_tokens,
                                                   device=torch.device("cpu"), seq_len=256)
            times[cache].append(time.perf_counter() - began)
    generation.KV_CACHE = True
    result = {"prompts": len(rows), "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
              "no_cache_s": round(min(times[False]), 2), "kv_cache_s": round(min(times[True]), 2),
              "speedup": round(min(times[False]) / min(times[True]), 1),
              "same_tokens": outputs[False] == outputs[True], "cpus": os.cpu_count()}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
