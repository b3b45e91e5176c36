"""Training throughput of the cpt trainer against a plain transformers loop, same process.

Both train the same model (same weights, AdamW settings, clipping) on the same token batches.
The plain loop gets its batches ready-made; ours pays for everything a real run does per step
(mixture sampling and packing, per-source losses, anomaly checks, metrics, event log). The two
take turns step by step in one process, so machine noise hits both alike; the figure is the
ratio of total tokens/s over the timed steps.

    python bench/bench_trainer.py                      # small random Llama on CPU
    python bench/bench_trainer.py --base demo-data/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --format gguf --seq-len 512 --batch 8          # the demo model (use a GPU)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from cpt_api import TrainerConfig  # noqa: E402
from cpt_trainer.loop import Attempt  # noqa: E402


def spec_for(base: str, fmt: str, corpus: Path, seq_len: int, batch: int, steps: int) -> dict:
    return {
        "baseModel": {"uri": base, "format": fmt},
        "data": {"sources": [
            {"name": "legal", "role": "domain", "uri": str(corpus / "domain" / "*.txt"), "weight": 0.8},
            {"name": "code", "role": "replay", "uri": str(corpus / "code" / "*.txt"), "weight": 0.2},
        ], "curation": {"decontaminate": False}},
        "packing": {"seqLen": seq_len, "boundary": "documentMask"},
        "optimizer": {"lr": 1e-4},
        "schedule": {"warmupSteps": 1, "decay": "cosine"},
        "budget": {"steps": steps},
        "training": {"microBatchSize": batch, "logEvery": 1},
        "checkpoint": {"every": 10**6, "keep": 1},
    }


def write_corpus(root: Path) -> Path:
    import glob
    import sysconfig

    (root / "domain").mkdir(parents=True)
    (root / "code").mkdir()
    for i, path in enumerate(sorted(glob.glob("/usr/share/common-licenses/*"))):
        if Path(path).is_file():
            (root / "domain" / f"{i}.txt").write_text(Path(path).read_text(errors="replace"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i, path in enumerate(sorted(stdlib.glob("*.py"))[:80]):
        (root / "code" / f"{i}.txt").write_text(path.read_text(errors="replace"))
    return root


def batches_like(cfg: TrainerConfig, n: int) -> list:
    """The same batches the trainer draws, from a second pipeline with the same seed."""
    from cpt_trainer.data import DataPipeline
    from cpt_trainer.model import load_tokenizer

    tok = load_tokenizer(cfg.spec.base_model, cfg.spec.tokenizer)
    data = DataPipeline(cfg, tok, 0, 1)
    return [data.next_batch(cfg.spec.training.micro_batch_size) for _ in range(n)]


class Plain:
    """The loop everyone writes first: HF loss, backward, clip, AdamW."""

    def __init__(self, base_dir: str, gguf: str | None, device: torch.device, bf16: bool):
        extra = {"gguf_file": gguf} if gguf else {}
        self.model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                          attn_implementation="sdpa", **extra).to(device)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                     weight_decay=0.1)
        self.device, self.bf16 = device, bf16

    def step(self, b) -> None:
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 \
            else torch.autocast("cpu", enabled=False)
        with ctx:
            out = self.model(input_ids=b.input_ids.to(self.device),
                             position_ids=b.position_ids.to(self.device),
                             labels=b.labels.to(self.device), use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="model (HF dir or .gguf); default: a random Llama built here")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "trainer.json"))
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        tmpdir = Path(tmp)
        corpus = write_corpus(tmpdir / "corpus")
        if args.base is None:
            from tests.conftest import build_tiny_model

            base = str(build_tiny_model(tmpdir / "model", vocab_size=4096, layers=4, hidden=256))
            label = "random Llama (4 layers, hidden 256, vocab 4096)"
        else:
            base, label = str(Path(args.base).resolve()), Path(args.base).name
        base_dir, gguf = (str(Path(base).parent), Path(base).name) if args.format == "gguf" else (base, None)
        spec = spec_for(base, args.format, corpus, args.seq_len, args.batch, args.steps + 1)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        bf16 = device.type == "cuda"
        cfg = TrainerConfig.model_validate({
            "run": "bench", "spec": spec, "runDir": str(tmpdir / "run"),
            "checkpointUri": str(tmpdir / "ckpt")})
        batches = batches_like(cfg, args.steps)
        attempt = Attempt(cfg)
        attempt.begin()
        plain = Plain(base_dir, gguf, device, bf16)
        ours_s = plain_s = 0.0
        tokens = attempt.tokens_per_step
        for i in range(args.steps):
            t_ours = timed(attempt.advance)
            t_plain = timed(plain.step, batches[i])
            if i >= args.warmup:
                ours_s, plain_s = ours_s + t_ours, plain_s + t_plain
        attempt.close()
        timed_steps = args.steps - args.warmup
        ours_tps, plain_tps = tokens * timed_steps / ours_s, tokens * timed_steps / plain_s
    result = {
        "benchmark": "trainer throughput vs a plain transformers loop",
        "model": label, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "seq_len": args.seq_len, "batch": args.batch,
        "steps_timed": args.steps - args.warmup,
        "ours_tokens_per_s": ours_tps, "plain_tokens_per_s": plain_tps,
    }
    result["ratio"] = result["ours_tokens_per_s"] / result["plain_tokens_per_s"]
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"ours / plain = {result['ratio']:.3f} (target >= 0.95); written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
