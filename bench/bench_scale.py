"""Scaling out on 4 CPU ranks: per-rank memory under fsdp vs ddp, checkpoint stall, data share.

A ~134 M-parameter Llama-shaped model (hidden 768, 12 layers, 12 heads, intermediate 2048,
vocab 32000, untied head; random init) is trained by 4 ranks under `torchrun --standalone
--nproc-per-node 4`, gloo on CPU, through the trainer's own code:

a. Memory. `cpt_trainer.parallel.parallelize` wraps the model for `fsdp` or `ddp` (one torchrun
   each); after one AdamW step every rank counts the bytes of its parameters, gradients and
   optimizer state (a DTensor's local shard under fsdp, the full tensors under ddp) and reads
   its peak RSS (VmHWM). Four fp32 AdamW replicas (~2.1 GB of state each) and activations have
   to fit in this 24 GB machine, so the step is small: seqLen 128 × batch 1.
b. Checkpoint stall. The trainer's `Checkpointer` saves the fsdp model and optimizer with
   `async_save` False and True, alternating; a synchronous save stalls training for the whole
   save, an asynchronous one only for `save()` itself (barrier, small files, copy to host
   memory). Both report the time to the manifest (the commit). One training step runs while
   the asynchronous save is in flight, against one without: on 2 cores the background writer
   competes with training, which the stall alone does not show.
c. Planner. `cpt_operator.policy.memory.estimate` for the same spec and layout, against the
   measured state bytes and against the peak RSS, for both strategies.
d. Data. Bytes each of 4 ranks reads of a corpus comes from `bench_data_shard.py` (run here);
   the data share of a step is measured in a real 4-rank fsdp run of the trainer (`Attempt`),
   as the time in `DataPipeline.next_batch` (with the DataLoader worker the trainer only
   dequeues) over the time of `Attempt.advance`.

Ratios are taken within this one run. The script launches torchrun on its own worker entry
(`--worker`) and collects one JSON per rank.

    python bench/bench_scale.py            # ~8 min on 2 cores; writes bench/results/scale.json
"""
from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from cpt_api.spec import CptRunSpec  # noqa: E402
from cpt_operator.policy.memory import Layout, MemoryPlan, estimate  # noqa: E402
from cpt_operator.policy.memory_host import HostPlan, host_estimate  # noqa: E402
from cpt_operator.policy.model_shape import ModelShape  # noqa: E402

WORLD = 4
MODEL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
             intermediate_size=2048, vocab_size=32000, tie_word_embeddings=False,
             max_position_embeddings=2048, use_cache=False)
GB = 1e9


def llama_config() -> LlamaConfig:
    return LlamaConfig(**MODEL)


# ------------------------------------------------------------------------------ rank side
def proc_status() -> dict[str, int]:
    """Current and peak resident set of this process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "peak_rss": int(fields["VmHWM"].split()[0]) * 1024}


def local_nbytes(t: torch.Tensor) -> int:
    """Bytes this rank holds of `t`: a DTensor's local shard, else the tensor."""
    to_local = getattr(t, "to_local", None)
    return int((to_local() if to_local is not None else t).nbytes)


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    moments = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {"parameters": sum(local_nbytes(p) for p in params),
            "gradients": sum(local_nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local_nbytes(t) for t in moments)}


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The trainer's optimizer: AdamW, no weight decay on 1-D tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=1e-4, betas=(0.9, 0.95))


def train_step(parallel: Any, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
               zero: bool = True) -> float:
    """Forward, token-summed loss, backward, clip, AdamW, as the loop does; returns seconds."""
    began = time.perf_counter()
    logits = parallel.forward(input_ids=ids, use_cache=False).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    loss.backward()
    parallel.clip(1.0)
    optimizer.step()
    if zero:
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - began


def snapshot(step: int, model: torch.nn.Module) -> Any:
    from cpt_api.manifest import Lineage
    from cpt_trainer.checkpointer import Snapshot

    lineage = Lineage(run="bench", attempt=1, parent=None, base_uri="random", restore_mode="weightsOnly",
                      data_version="bench", tokenizer_hash="bench", config_hash="bench")
    return Snapshot(step=step, tokens=0, train_state={"step": step}, data_state={}, lineage=lineage,
                    evals={}, train_loss=None, stable=True, config_json="{}",
                    write_model_files=model.config.save_pretrained)


def measure_saves(parallel: Any, optimizer: torch.optim.Optimizer, dist: Any, ids: torch.Tensor,
                  directory: str, rounds: int) -> list[dict[str, Any]]:
    """Sync and async saves of the same state, alternating; a step beside each async save."""
    from cpt_trainer.checkpointer import Checkpointer

    savers = {mode: Checkpointer(os.path.join(directory, mode), dist, keep=1, async_save=mode == "async")
              for mode in ("sync", "async")}
    out = []
    try:
        for r in range(rounds):
            for mode, saver in savers.items():
                step = 2 * r + (mode == "async") + 1
                began = time.perf_counter()
                saver.save(parallel.model, optimizer, snapshot(step, parallel.model))
                blocked = time.perf_counter() - began
                beside = train_step(parallel, optimizer, ids) if mode == "async" else None
                saver.wait()
                saved = saver.completed()[0]
                alone = train_step(parallel, optimizer, ids) if mode == "async" else None
                out.append({"mode": mode, "round": r, "save_call_s": blocked,
                            "stall_s": saved.stall_seconds, "commit_s": saved.seconds,
                            "step_beside_save_s": beside, "step_alone_s": alone})
    finally:
        for saver in savers.values():
            saver.close()
    return out


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    from cpt_api.spec import ParallelismSpec
    from cpt_trainer import distributed
    from cpt_trainer.parallel import parallelize

    dist = distributed.setup(use_cuda=False)
    rss = {"after_imports": proc_status()}
    torch.manual_seed(0)  # the same random weights on every rank, as a loaded base would be
    model = LlamaForCausalLM._from_config(llama_config(), attn_implementation="sdpa", dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    rss["model_built"] = proc_status()
    parallel = parallelize(model, ParallelismSpec(strategy=args.strategy), dist,
                           procs_per_node=WORLD, compute_dtype=None)
    model.train()
    optimizer = adamw(model)
    ids = torch.randint(0, MODEL["vocab_size"], (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(dist.rank))
    step_s = train_step(parallel, optimizer, ids, zero=False)
    result = {"rank": dist.rank, "strategy": args.strategy, "params": n_params, "step_s": step_s,
              "state": state_bytes(model, optimizer)}
    optimizer.zero_grad(set_to_none=True)
    rss["after_step"] = proc_status()
    result["rss"] = rss
    if args.saves:
        result["saves"] = measure_saves(parallel, optimizer, dist, ids, args.ckpt_dir, args.saves)
        rss["after_saves"] = proc_status()  # the stager keeps its host copy while the state lives
    distributed.teardown()
    return result


def training_worker(args: argparse.Namespace) -> dict[str, Any]:
    """A real trainer attempt: time in DataPipeline.next_batch against the whole step."""
    from cpt_api.trainer_config import TrainerConfig
    from cpt_trainer import distributed
    from cpt_trainer.loop import Attempt

    attempt = Attempt(TrainerConfig.model_validate_json(Path(args.config).read_text()))
    attempt.begin()
    data_s = [0.0]
    next_batch = attempt.data.next_batch

    def timed_next_batch(n: int) -> Any:
        began = time.perf_counter()
        try:
            return next_batch(n)
        finally:
            data_s[0] += time.perf_counter() - began

    attempt.data.next_batch = timed_next_batch  # type: ignore[method-assign]
    steps = []
    for _ in range(args.steps):
        data_before, began = data_s[0], time.perf_counter()
        attempt.advance()
        steps.append({"step_s": time.perf_counter() - began, "data_s": data_s[0] - data_before})
    attempt.data.close()
    attempt.close()
    distributed.teardown()
    return {"rank": attempt.dist.rank, "steps": steps}


# ---------------------------------------------------------------------------- launcher side
def torchrun(worker: str, out_dir: Path, *extra: str) -> list[dict[str, Any]]:
    """Run `worker` on WORLD ranks; returns each rank's JSON, in rank order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           __file__, "--worker", worker, "--rank-out", str(out_dir), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def planned(strategy: str, seq_len: int, batch: int) -> tuple[MemoryPlan, HostPlan]:
    """The step's plan and the host plan of the same spec and layout."""
    spec = CptRunSpec.model_validate({
        "baseModel": {"uri": "random"}, "data": {"sources": [{"name": "d", "role": "domain", "uri": "d"}]},
        "budget": {"steps": 1000}, "packing": {"seqLen": seq_len},
        "resources": {"nprocPerNode": WORLD},
        "training": {"microBatchSize": batch, "parallelism": {"strategy": strategy}}})
    shape = ModelShape.from_hf_config(llama_config().to_dict())
    layout = Layout(nodes=1, procs_per_node=WORLD, gpu=False)
    return estimate(spec, shape, layout), host_estimate(spec, shape, layout)


def memory_summary(ranks: list[dict[str, Any]], plan: MemoryPlan, host: HostPlan) -> dict[str, Any]:
    """Measured against planned. The plan's parameters and gradients include, under fsdp, the
    unsharded copies of two blocks and the root that exist only inside forward / backward; after
    the step they are freed, so the measured state is compared with the plan less those copies
    ("steady") as well as with the whole plan. The step's plan is compared with the peak RSS, and
    so is the host plan of a rank (the step with the data worker and the checkpoint staging copy
    this one-step process does not have)."""
    shape = ModelShape.from_hf_config(llama_config().to_dict())
    gathered = 4 * (2 * shape.block_params + shape.root_params) if plan.strategy == "fsdp" else 0
    state = max(sum(r["state"].values()) for r in ranks)
    peak = max(r["rss"]["after_step"]["peak_rss"] for r in ranks)
    plan_state = plan.parameters + plan.gradients + plan.optimizer
    return {"state_bytes_per_rank": state, "state_parts_rank0": ranks[0]["state"],
            "peak_rss_per_rank": peak, "rss_rank0": ranks[0]["rss"], "step_s": ranks[0]["step_s"],
            "planned": plan.parts(), "planned_total": host.rank, "planned_state": plan_state,
            "planned_transient_gathers": 2 * gathered,
            "planned_steady_state_over_measured": (plan_state - 2 * gathered) / state,
            "planned_state_over_measured": plan_state / state,
            "planned_total_over_peak_rss": host.rank / peak,
            # this measuring process runs one step: no data worker, no checkpoint staging copy
            "planned_step_total": plan.total,
            "planned_step_total_over_peak_rss": plan.total / peak}


def save_summary(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per round the slowest rank (a step goes as fast as its slowest rank), then the mean."""
    rounds = ranks[0]["saves"]

    def mean(mode: str, key: str) -> float:
        per_round = [max(r["saves"][i][key] for r in ranks) for i, s in enumerate(rounds)
                     if s["mode"] == mode and s[key] is not None]
        return sum(per_round) / len(per_round)

    out: dict[str, Any] = {mode: {"stall_s": mean(mode, "save_call_s"), "commit_s": mean(mode, "commit_s"),
                                  "stall_seconds_reported": mean(mode, "stall_s")}
                           for mode in ("sync", "async")}
    out["async_stall_over_sync"] = out["async"]["stall_s"] / out["sync"]["stall_s"]
    out["step_beside_async_save_s"] = mean("async", "step_beside_save_s")
    out["step_alone_s"] = mean("async", "step_alone_s")
    return out


def write_model(directory: Path, tokenizer: Any) -> None:
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config()).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def training_config(tmp: Path, corpus: Path, model: Path, seq_len: int, batch: int, steps: int) -> Path:
    from cpt_api.trainer_config import TrainerConfig

    sources = [{"name": "code", "role": "domain", "uri": str(corpus / "code" / "*.jsonl"),
                "format": "jsonl", "weight": 0.7},
               {"name": "prose", "role": "replay", "uri": str(corpus / "prose" / "*.txt"), "weight": 0.3}]
    cfg = TrainerConfig.model_validate({
        "run": "bench", "runDir": str(tmp / "run"), "checkpointUri": str(tmp / "run-ckpt"),
        "spec": {"baseModel": {"uri": str(model), "format": "hf"},
                 "data": {"sources": sources, "curation": {"decontaminate": False}},
                 "packing": {"seqLen": seq_len}, "budget": {"steps": steps + 1},
                 "schedule": {"warmupSteps": 0}, "resources": {"nprocPerNode": WORLD},
                 "training": {"microBatchSize": batch, "parallelism": {"strategy": "fsdp"}},
                 "checkpoint": {"every": 10**6, "keep": 1}}})
    path = tmp / "trainer-config.json"
    path.write_text(cfg.dump_json())
    return path


def data_summary(ranks: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    timed = [s for r in ranks for s in r["steps"][warmup:]]
    step, data = sum(s["step_s"] for s in timed), sum(s["data_s"] for s in timed)
    first = max(r["steps"][0]["data_s"] for r in ranks)
    return {"steps_timed": len(timed) // WORLD, "mean_step_s": step / len(timed),
            "mean_data_s": data / len(timed), "data_share_of_step": data / step,
            "first_step_data_s": first}


def measure_data(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    import bench_data_shard
    from bench_data import train_tokenizer

    share = bench_data_shard.measure(jsonl_mb=24, text_files=300, unit_bytes=1 << 20,
                                     seq_len=1024, batch=8)
    corpus = tmp / "corpus"
    bench_data_shard.write_corpus(corpus, 4, 60)
    tokenizer = train_tokenizer([p.read_text() for p in sorted((corpus / "prose").glob("*"))[:20]],
                                tmp / "tok", 8192)
    write_model(tmp / "model", tokenizer)
    config = training_config(tmp, corpus, tmp / "model", args.seq_len, args.batch, args.train_steps)
    ranks = torchrun("train", tmp / "train", "--config", str(config), "--steps", str(args.train_steps))
    return {"bytes_read": {"share_of_corpus": share["share_of_corpus"],
                           "within_target": share["within_target"], "corpus_bytes": share["corpus_bytes"]},
            "training": data_summary(ranks, args.train_warmup)}


def report(result: dict[str, Any]) -> None:
    mem, saves, data = result["memory"], result["checkpoint"], result["data"]
    fsdp, ddp = mem["fsdp"], mem["ddp"]
    print(f"model: {result['params'] / 1e6:.1f} M parameters; {WORLD} ranks, gloo, fp32, "
          f"seqLen {result['seq_len']} x batch {result['batch']}")
    for name, m in (("fsdp", fsdp), ("ddp", ddp)):
        print(f"  {name}: state {m['state_bytes_per_rank'] / GB:.3f} GB/rank, peak RSS "
              f"{m['peak_rss_per_rank'] / GB:.2f} GB; planned state {m['planned_state'] / GB:.3f} GB "
              f"({m['planned_state_over_measured']:.2f}x; without the transient gathers "
              f"{m['planned_steady_state_over_measured']:.2f}x), planned total "
              f"{m['planned_total'] / GB:.2f} GB ({m['planned_total_over_peak_rss']:.2f}x peak RSS); "
              f"less the data worker and staging copy this step does not have "
              f"{m['planned_step_total'] / GB:.2f} GB ({m['planned_step_total_over_peak_rss']:.2f}x)")
    print(f"fsdp / ddp state bytes = {mem['fsdp_over_ddp_state']:.3f} (target <= 0.35); "
          f"peak RSS {mem['fsdp_over_ddp_peak_rss']:.3f}")
    print(f"save stall: async {saves['async']['stall_s']:.2f} s vs sync {saves['sync']['stall_s']:.2f} s = "
          f"{saves['async_stall_over_sync']:.3f} (target <= 0.10); commit async "
          f"{saves['async']['commit_s']:.2f} s, sync {saves['sync']['commit_s']:.2f} s; a step beside "
          f"the async save {saves['step_beside_async_save_s']:.2f} s vs {saves['step_alone_s']:.2f} s alone")
    if data is None:
        return
    t = data["training"]
    print(f"data: bytes read per rank {', '.join(f'{s:.3f}' for s in data['bytes_read']['share_of_corpus'])}"
          f" of the corpus (target 0.25 +- 10 %); next_batch {1000 * t['mean_data_s']:.2f} ms of a "
          f"{t['mean_step_s']:.2f} s step = {100 * t['data_share_of_step']:.3f} % (target < 1 %)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--save-rounds", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--train-warmup", type=int, default=2)
    p.add_argument("--skip-data", action="store_true", help="parts a-c only")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    # the rank side (under torchrun)
    p.add_argument("--worker", choices=["memory", "train"], help=argparse.SUPPRESS)
    p.add_argument("--rank-out", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--saves", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ckpt-dir", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = (memory_worker if args.worker == "memory" else training_worker)(args)
        Path(args.rank_out, f"rank{result['rank']}.json").write_text(json.dumps(result, indent=2))
        return 0
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_name:
        tmp, shape = Path(tmp_name), ["--seq-len", str(args.seq_len), "--batch", str(args.batch)]
        ranks = {"ddp": torchrun("memory", tmp / "ddp", "--strategy", "ddp", *shape),
                 "fsdp": torchrun("memory", tmp / "fsdp", "--strategy", "fsdp", *shape,
                                  "--saves", str(args.save_rounds), "--ckpt-dir", str(tmp / "ckpt"))}
        data = None if args.skip_data else measure_data(tmp, args)
    mem = {s: memory_summary(r, *planned(s, args.seq_len, args.batch)) for s, r in ranks.items()}
    mem["fsdp_over_ddp_state"] = mem["fsdp"]["state_bytes_per_rank"] / mem["ddp"]["state_bytes_per_rank"]
    mem["fsdp_over_ddp_peak_rss"] = mem["fsdp"]["peak_rss_per_rank"] / mem["ddp"]["peak_rss_per_rank"]
    result = {"benchmark": "4 CPU ranks: fsdp vs ddp memory, checkpoint stall, data share",
              "model": MODEL, "params": ranks["fsdp"][0]["params"], "world_size": WORLD,
              "backend": "gloo", "cpus": os.cpu_count(), "torch": torch.__version__,
              "seq_len": args.seq_len, "batch": args.batch, "memory": mem,
              "checkpoint": save_summary(ranks["fsdp"]),
              "checkpoint_rounds": ranks["fsdp"][0]["saves"], "data": data,
              "seconds": time.perf_counter() - began}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    print(f"written to {args.out} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
