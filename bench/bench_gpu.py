"""A ~1B Llama on every visible GPU: tokens/s, MFU and HFU, document-mask cost, checkpoint stall.

The model is random (hidden 2048, 16 layers, 16 heads, 8 kv heads, intermediate 5632, vocab
32000), built empty and allocated straight into each rank's shards, then wrapped by the trainer's
own `cpt_trainer.parallel.parallelize` (fsdp over all ranks; one GPU is a plain module, as in the
trainer) with bf16 compute, and trained as the loop trains: autocast, fp32 logits, clip, AdamW.

- Throughput at seqLen 4096: global tokens/s over the timed steps; MFU = FLOPs per token
  (`cpt_trainer.perf.flops_per_token`, 6·N + 12·L·H·Q·T) × tokens/s over the peak of all GPUs
  (`perf.peak_flops`). HFU also counts what the hardware recomputes: with activationCheckpointing
  full every block's forward runs twice (+2·N_blocks + 4·L·H·Q·T per token); without it HFU = MFU.
- Document mask: the same tokens, once as one causal sequence per row and once as packed
  documents (lengths 64-2048) whose position ids restart at 0, which transformers turns into a
  block-diagonal mask. Attention is flash_attention_2 when flash_attn is importable (one flattened
  row, varlen), else flex_attention, else sdpa; the trainer's `check_document_isolation` must pass.
- Checkpoint: the trainer's `Checkpointer` saves the model and AdamW state synchronously and then
  asynchronously; the stall is the time `save()` blocks; both report the time to the manifest.

Rank 0 writes bench/results/gpu.json and prints a summary.

    bench/gpu.sh                                 # a GPU machine: all GPUs, under 8 minutes
    python bench/bench_gpu.py --cpu-smoke        # the same code: 2 CPU ranks, gloo, fp32, tiny
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cpt_api.spec import ParallelismSpec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_scale import snapshot  # noqa: E402  (the same small checkpoint snapshot)

MODEL_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096)
MODEL_SMOKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=512, max_position_embeddings=128)


# ------------------------------------------------------------------------------ model
def build(shape: dict[str, int], attention: str, ac: str, dist: Any, bf16: bool, tmp: str) -> Any:
    """The model as the trainer builds it from a checkpoint: an empty skeleton, sharded, then
    allocated per rank; random init on each rank's own shard."""
    from transformers import LlamaConfig

    from cpt_trainer.model import skeleton
    from cpt_trainer.parallel import parallelize

    config_dir = Path(tmp, f"config-{attention}")
    if dist.is_main:
        LlamaConfig(**shape, tie_word_embeddings=False, use_cache=False).save_pretrained(config_dir)
    _barrier()
    model = skeleton(str(config_dir), attention=attention)
    spec = ParallelismSpec.model_validate({"strategy": "fsdp", "activationCheckpointing": ac})
    parallel = parallelize(model, spec, dist, procs_per_node=dist.world_size,
                           compute_dtype=torch.bfloat16 if bf16 else None)
    init_weights(parallel.model)
    parallel.model.train()
    return parallel


def init_weights(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.normal_(0.0, 0.02) if p.ndim >= 2 else local.fill_(1.0)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=1e-4, betas=(0.9, 0.95))


def block_params(model: torch.nn.Module) -> int:
    from cpt_trainer.parallel import decoder_blocks

    return sum(p.numel() for b in decoder_blocks(model) for p in b.parameters())


# ------------------------------------------------------------------------------ batches
def batch(vocab: int, rows: int, seq_len: int, packed: bool, seed: int) -> Any:
    """Random tokens; packed: documents of 64-2048 tokens whose positions restart at 0."""
    from cpt_trainer.data import Batch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    positions = torch.arange(seq_len).repeat(rows, 1)
    if packed:
        for row in positions:
            start = 0
            while start < seq_len:
                length = int(torch.randint(64, 2049, (1,), generator=gen))
                row[start:start + length] = torch.arange(min(length, seq_len - start))
                start += length
    return Batch(ids, ids.clone(), positions, torch.zeros_like(ids), rows * seq_len)


def step(parallel: Any, optimizer: torch.optim.Optimizer, b: Any, flatten: bool, bf16: bool) -> None:
    """One training step as loop.py takes it."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        logits = parallel.forward(**b.model_inputs(flatten=flatten)).logits
    logits = logits.view(*b.input_ids.shape, -1)[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), b.labels[:, 1:].reshape(-1))
    loss.backward()
    parallel.clip(1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(parallel: Any, optimizer: torch.optim.Optimizer, b: Any, args: argparse.Namespace,
          flatten: bool, device: torch.device) -> float:
    """Seconds per step over args.steps steps after args.warmup."""
    b = b.to(device)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            _sync(device)
            began = time.perf_counter()
        step(parallel, optimizer, b, flatten, args.bf16)
    _sync(device)
    return (time.perf_counter() - began) / args.steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier() -> None:
    from cpt_trainer import distributed

    distributed.barrier()


# ------------------------------------------------------------------------------ figures
def throughput(seconds: float, tokens_per_rank: int, world: int, flops_token: float,
               extra_flops_token: float, peak: float | None) -> dict[str, Any]:
    tps = tokens_per_rank * world / seconds
    mfu = flops_token * tps / (peak * world) if peak else None
    hfu = (flops_token + extra_flops_token) * tps / (peak * world) if peak else None
    return {"step_s": seconds, "tokens_per_s": tps, "mfu": mfu, "hfu": hfu}


def recompute_flops(model: torch.nn.Module, seq_len: int) -> float:
    """What full activation checkpointing runs again per token: every block's forward."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2.0 * block_params(model) + 4.0 * cfg.num_hidden_layers * heads * head_dim * seq_len


def isolation(parallel: Any, flatten: bool, bf16: bool) -> str:
    """The trainer's start-up check, with a bf16 tolerance when computing in bf16."""
    from cpt_trainer.data import check_document_isolation

    try:
        check_document_isolation(parallel.model, flatten=flatten, atol=5e-2 if bf16 else None)
        return "ok"
    except RuntimeError as exc:
        return f"failed: {exc}"
    finally:
        parallel.reshard()


def saves(parallel: Any, optimizer: torch.optim.Optimizer, dist: Any, directory: str) -> dict[str, Any]:
    """One synchronous and one asynchronous save of the same state."""
    from cpt_trainer.checkpointer import Checkpointer

    out: dict[str, Any] = {}
    for i, mode in enumerate(("sync", "async")):
        saver = Checkpointer(os.path.join(directory, mode), dist, keep=1, async_save=mode == "async")
        began = time.perf_counter()
        saver.save(parallel.model, optimizer, snapshot(i + 1, parallel.model))
        stall = time.perf_counter() - began
        saver.close()
        out[mode] = {"stall_s": stall, "commit_s": saver.completed()[0].seconds}
        _barrier()
        if dist.is_main:  # the disk holds one checkpoint of the 1B state at a time
            shutil.rmtree(os.path.join(directory, mode), ignore_errors=True)
    out["async_stall_over_sync"] = out["async"]["stall_s"] / out["sync"]["stall_s"]
    return out


# ------------------------------------------------------------------------------ rank side
class Run:
    """What every measurement shares: ranks, device, shapes, the two batches, the scratch dir."""

    def __init__(self, args: argparse.Namespace, dist: Any):
        from cpt_trainer import distributed
        from cpt_trainer.perf import peak_flops

        self.args, self.dist = args, dist
        self.cuda = dist.device.type == "cuda"
        self.shape = MODEL_SMOKE if args.cpu_smoke else MODEL_1B
        self.peak = peak_flops(dist.device) if self.cuda else None
        self.tokens = args.batch * args.seq_len
        vocab = self.shape["vocab_size"]
        self.causal = batch(vocab, args.batch, args.seq_len, packed=False, seed=dist.rank)
        self.packed = batch(vocab, args.batch, args.seq_len, packed=True, seed=dist.rank)
        # one directory for all ranks: rank 0 writes the config there, checkpoints go there
        self.tmp = str(distributed.broadcast_object(
            tempfile.mkdtemp(prefix="bench-gpu-", dir=args.scratch) if dist.is_main else None))

    def model(self, attention: str, ac: str = "none") -> tuple[Any, torch.optim.Optimizer]:
        _free(self.cuda)
        parallel = build(self.shape, attention, ac, self.dist, self.args.bf16, self.tmp)
        return parallel, adamw(parallel.model)

    def seconds(self, parallel: Any, optimizer: torch.optim.Optimizer, packed: bool, flatten: bool) -> float:
        b = self.packed if packed else self.causal
        return timed(parallel, optimizer, b, self.args, flatten, self.dist.device)

    def figures(self, seconds: float, flops: float, extra: float = 0.0) -> dict[str, Any]:
        return throughput(seconds, self.tokens, self.dist.world_size, flops, extra, self.peak)


def measure_default(run: Run, result: dict[str, Any]) -> tuple[float, float]:
    """Throughput and checkpoints on the trainer's default attention (sdpa), no recompute."""
    from cpt_trainer.perf import flops_per_token

    parallel, optimizer = run.model("sdpa")
    result["params"] = sum(p.numel() for p in parallel.model.parameters())
    result["strategy"] = str(parallel.strategy.value) if parallel.strategy else "single"
    flops = result["flops_per_token"] = flops_per_token(parallel.model, run.args.seq_len)
    seconds = run.seconds(parallel, optimizer, packed=False, flatten=False)
    result["causal_sdpa"] = run.figures(seconds, flops)
    result["checkpoint"] = saves(parallel, optimizer, run.dist, run.tmp)
    return seconds, flops


def measure_mask(run: Run, result: dict[str, Any], attention: str, flops: float, t_sdpa: float) -> None:
    """The same tokens as one causal sequence per row and as packed documents, one backend."""
    flatten = attention == "flash_attention_2"
    parallel, optimizer = run.model(attention)
    result["attention"] = attention
    result["document_isolation"] = isolation(parallel, flatten, run.args.bf16)
    t_causal = run.seconds(parallel, optimizer, packed=False, flatten=False)
    t_packed = run.seconds(parallel, optimizer, packed=True, flatten=flatten)
    result["causal"] = run.figures(t_causal, flops)
    result["document_mask"] = run.figures(t_packed, flops)
    result["document_mask_overhead"] = t_packed / t_causal - 1
    result["document_mask_over_causal_sdpa"] = t_packed / t_sdpa - 1


def measure_recompute(run: Run, result: dict[str, Any], flops: float) -> None:
    """Full activation checkpointing: the hardware runs every block's forward twice."""
    parallel, optimizer = run.model("sdpa", "full")
    seconds = run.seconds(parallel, optimizer, packed=False, flatten=False)
    extra = recompute_flops(parallel.model, run.args.seq_len)
    result["activation_checkpointing_full"] = run.figures(seconds, flops, extra)


def rank_main(args: argparse.Namespace) -> dict[str, Any]:
    from cpt_trainer import distributed

    dist = distributed.setup(use_cuda=not args.cpu_smoke)
    torch.manual_seed(1000 + dist.rank)
    args.bf16 = dist.device.type == "cuda"
    run = Run(args, dist)
    result: dict[str, Any] = {
        "rank": dist.rank, "device": torch.cuda.get_device_name(dist.device) if run.cuda else "cpu",
        "world_size": dist.world_size, "peak_flops_per_device": run.peak, "model": run.shape,
        "seq_len": args.seq_len, "batch_per_rank": args.batch, "precision": "bf16" if run.cuda else "fp32",
        "torch": torch.__version__}
    t_sdpa, flops = measure_default(run, result)
    from cpt_trainer.model import attention_backend

    attention = args.attention or attention_backend("auto", torch.device("cuda" if run.cuda else "cpu"))
    try:
        measure_mask(run, result, attention, flops, t_sdpa)
    except Exception as exc:  # a backend that fails here (e.g. flex compile) must not cost the rest
        result["document_mask_error"] = f"{attention}: {type(exc).__name__}: {exc}"[:2000]
        measure_mask(run, result, "sdpa", flops, t_sdpa)
    measure_recompute(run, result, flops)
    if run.cuda:
        result["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(dist.device) / 1e9
    distributed.barrier()
    if dist.is_main:
        shutil.rmtree(run.tmp, ignore_errors=True)
    distributed.teardown()
    return result


def _free(cuda: bool) -> None:
    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def summary(r: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "n/a (no known peak)" if x is None else f"{100 * x:.1f} %"

    c, d = r["causal_sdpa"], r["document_mask"]
    a, s = r["activation_checkpointing_full"], r["checkpoint"]
    return "\n".join([
        f"{r['params'] / 1e6:,.1f} M params, {r['world_size']} x {r['device']} ({r['strategy']}, "
        f"{r['precision']}), seqLen {r['seq_len']} x {r['batch_per_rank']} per rank",
        f"no checkpointing (sdpa):   {c['tokens_per_s']:,.0f} tok/s, MFU {pct(c['mfu'])}, HFU {pct(c['hfu'])}",
        f"full checkpointing (sdpa): {a['tokens_per_s']:,.0f} tok/s, MFU {pct(a['mfu'])}, HFU {pct(a['hfu'])}",
        f"document mask ({r['attention']}): {d['tokens_per_s']:,.0f} tok/s, "
        f"{100 * r['document_mask_overhead']:+.1f} % vs causal on the same backend (target < 10 %), "
        f"{100 * r['document_mask_over_causal_sdpa']:+.1f} % vs causal sdpa; isolation check "
        f"{r['document_isolation']}",
        f"save stall: async {s['async']['stall_s']:.2f} s vs sync {s['sync']['stall_s']:.2f} s = "
        f"{s['async_stall_over_sync']:.3f} (target <= 0.10); commit async {s['async']['commit_s']:.1f} s, "
        f"sync {s['sync']['commit_s']:.1f} s"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="2 CPU ranks (gloo, fp32), tiny model, seqLen 128")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--attention", help="override the document-mask attention backend")
    p.add_argument("--scratch", help="directory for checkpoints (default: the system temp dir)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    args = p.parse_args()
    if args.cpu_smoke:
        args.seq_len, args.batch, args.warmup, args.steps = 128, 2, 1, 2
        if "RANK" not in os.environ:  # launch ourselves on 2 ranks
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   __file__, *sys.argv[1:]]
            return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    result = rank_main(args)
    if result["rank"] == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(summary(result))
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
