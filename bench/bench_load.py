"""Loading a ~0.9 B-parameter base on 4 CPU ranks: per-rank peak host memory and bytes read.

A Llama-shaped model (hidden 2048, 16 layers, 16 heads, intermediate 5632, tied embeddings,
vocabulary from a tokenizer trained here; random init) is saved as sharded HF safetensors in
bf16 (500 MB files). The real trainer (`torchrun --nproc-per-node 4 -m cpt_trainer`, gloo, fsdp,
fp32 master weights) then starts from it:

a. local: from the directory on this machine; one training step, then the run is killed (a
   step's fp32 AdamW state for 0.9 B parameters on four ranks is most of this 24 GB machine; the
   final checkpoint's host staging would not fit beside it).
b. reference: the same with `refKL.beta: 0.1` (the frozen base loaded the same way), killed once
   it has started.
c. s3: from a versitygw S3 server on this machine (the test cluster's binary); the node
   downloads the base once, the ranks read their rows from that copy. Killed after one step.
d. fixed: the same trainer with a 2-layer, hidden-64 model of the same vocabulary: what a rank
   costs with next to no weights (interpreter, torch, transformers, tokenizer, data pipeline).
e. whole: what each rank did before sharded loading, `from_pretrained` of the whole base in fp32
   in one process (4 ranks did it at once; measured once to keep this machine alive).

Each trainer rank's peak resident memory (VmHWM, read every 50 ms) is taken when the attempt's
`started` event appears (the load, the document-isolation check and the data pipeline's start)
and at the end. The bound the loader must meet, per rank: 1.25 × (fixed + the rank's shard of
the weights in fp32 + one decoder block), with the reference's shard added in (b). The planner's
host plan (`cptctl plan`) for the same spec is printed beside the measured peaks. Bytes read per
rank come from the `started` event (`loadedBytes`).

    python bench/bench_load.py                # ~15 min on 2 cores; writes bench/results/load.json
    python bench/bench_load.py --size small   # a 60 M model, ~3 min: the same path, quickly
"""
from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cpt_api.spec import CptRunSpec  # noqa: E402
from cpt_api.trainer_config import TrainerConfig  # noqa: E402
from cpt_operator.policy.memory_host import host_estimate  # noqa: E402
from cpt_operator.policy.model_shape import ModelShape  # noqa: E402

WORLD = 4
SIZES = {
    "0.9b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                 intermediate_size=5632),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=1376),
}
FIXED = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=128)
GIB = 1 << 30


def save_base(out: Path, tokenizer: Any, shape: dict[str, int]) -> Path:
    """A random-init Llama of `shape` with `tokenizer`, as sharded bf16 safetensors (once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, **shape)
    with torch.device("cpu"):
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out, max_shard_size="500MB")
    tokenizer.save_pretrained(out)
    return out


def trainer_config(work: Path, name: str, corpus: Path, base: str, beta: float) -> Path:
    sources = [{"name": "code", "role": "domain", "uri": str(corpus / "code" / "*.jsonl"),
                "format": "jsonl", "weight": 0.7},
               {"name": "prose", "role": "replay", "uri": str(corpus / "prose" / "*.txt"), "weight": 0.3}]
    run = work / name
    cfg = TrainerConfig.model_validate({
        "run": name, "runDir": str(run), "checkpointUri": str(run / "ckpt"),
        "spec": {"baseModel": {"uri": base, "format": "hf"},
                 "data": {"sources": sources, "curation": {"decontaminate": False}},
                 "packing": {"seqLen": 64}, "budget": {"steps": 3}, "schedule": {"warmupSteps": 0},
                 "regularization": {"refKL": {"beta": beta}},
                 "resources": {"nprocPerNode": WORLD},
                 "training": {"microBatchSize": 1, "parallelism": {"strategy": "fsdp"}},
                 "checkpoint": {"every": 10**6, "keep": 1}}})
    run.mkdir(parents=True, exist_ok=True)
    path = run / "trainer-config.json"
    path.write_text(cfg.dump_json())
    return path


class Peaks(threading.Thread):
    """VmHWM of every rank of a torchrun, sampled until stopped."""

    def __init__(self, launcher: int):
        super().__init__(daemon=True)
        self.launcher, self.done = launcher, threading.Event()
        self.peak: dict[int, int] = {}

    def run(self) -> None:
        while not self.done.is_set():
            for pid in _children(self.launcher):
                try:
                    self.peak[pid] = max(self.peak.get(pid, 0), _hwm(pid))
                except (OSError, ValueError):
                    pass
            time.sleep(0.05)

    def ranks(self) -> list[int]:
        """Peaks of the rank processes (the launcher's children), largest first."""
        return sorted(self.peak.values(), reverse=True)[:WORLD]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no VmHWM")


def _events(config: Path) -> list[dict[str, Any]]:
    path = config.parent / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_trainer(config: Path, env: dict[str, str], until: str, timeout: float = 1800) -> dict[str, Any]:
    """Start the trainer; kill it once an event of kind `until` (started | progress) is written.
    Returns the per-rank peaks at `started` and at the end, and the `started` event."""
    log = open(config.parent / "trainer.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={WORLD}", "-m", "cpt_trainer", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    peaks = Peaks(proc.pid)
    peaks.start()
    began, at_start = time.monotonic(), None
    try:
        while time.monotonic() - began < timeout:
            kinds = [e["event"] for e in _events(config)]
            if at_start is None and "started" in kinds:
                at_start = peaks.ranks()
            if until in kinds or "finished" in kinds or proc.poll() is not None:
                break
            time.sleep(0.2)
        else:
            raise TimeoutError(f"{config}: no {until} event in {timeout} s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        peaks.done.set()
        peaks.join()
    events = _events(config)
    started = next((e for e in events if e["event"] == "started"), None)
    if started is None or not any(e["event"] == until for e in events):
        tail = (config.parent / "trainer.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{config}: the trainer did not reach {until}:\n{tail}")
    return {"load_peak": at_start, "end_peak": peaks.ranks(), "started": started,
            "seconds": time.monotonic() - began}


def whole_model_peak(base: Path) -> int:
    """Peak RSS of one process loading the whole base in fp32, as each rank used to."""
    code = ("import resource, torch; from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained({str(base)!r}, dtype=torch.float32); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def planned(config: Path, base: Path) -> dict[str, Any]:
    """The host plan of the run, with the spec and model config it was made from (so that
    tests/unit/policy/test_plan_against_bench.py can plan them again)."""
    spec_doc = json.loads(config.read_text())["spec"]
    model_config = json.loads((base / "config.json").read_text())
    shape = ModelShape.from_hf_config(model_config)
    plan = host_estimate(CptRunSpec.model_validate(spec_doc), shape)
    return {"loading": sum(plan.loading.values()), "training": sum(plan.training.values()),
            "params": shape.params, "block_params": shape.block_params,
            "spec": spec_doc, "model_config": model_config}


def bound(fixed: int, params: int, block_params: int, models: int = 1) -> int:
    return int(1.25 * (fixed + models * 4 * params / WORLD + 4 * block_params))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="0.9b")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "cpt-operator" / "bench-load")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 run (no versitygw here)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    parser.add_argument("--report", action="store_true",
                        help="print the figures of --out again, with the planner as it is now")
    args = parser.parse_args()
    if args.report:
        result = json.loads(args.out.read_text())
        work = args.work / result["size"]
        result["plan"] = planned(work / "local" / "trainer-config.json", work / "base")
        args.out.write_text(json.dumps(result, indent=1))
        report(result)
        return 0

    import bench_data_shard
    from bench_data import train_tokenizer

    work = args.work / args.size
    corpus = args.work / "corpus"
    if not corpus.exists():
        bench_data_shard.write_corpus(corpus, 4, 60)
    tokenizer = train_tokenizer([p.read_text() for p in sorted((corpus / "prose").glob("*"))[:20]],
                                args.work / "tok", 32000)
    base = save_base(work / "base", tokenizer, SIZES[args.size])
    fixed_base = save_base(args.work / "fixed-base", tokenizer, FIXED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "CPT_CACHE_DIR": str(work / "node-cache")}
    result: dict[str, Any] = {"size": args.size, "world": WORLD}
    result["fixed"] = run_trainer(trainer_config(work, "fixed", corpus, str(fixed_base), 0.0), env, "started")
    local = trainer_config(work, "local", corpus, str(base), 0.0)
    result["plan"] = planned(local, base)
    result["local"] = run_trainer(local, env, "progress")
    result["reference"] = run_trainer(trainer_config(work, "reference", corpus, str(base), 0.1), env, "started")
    if not args.no_s3:
        result["s3"] = from_s3(work, corpus, base, env)
    result["whole"] = whole_model_peak(base)
    result["stored_bytes"] = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    report(result)
    return 0


def from_s3(work: Path, corpus: Path, base: Path, env: dict[str, str]) -> dict[str, Any]:
    from tests.cluster.cluster import S3Server

    import shutil

    shutil.rmtree(work / "node-cache" / "remote", ignore_errors=True)  # a fresh node: one download
    s3 = S3Server(work / "s3").start()
    try:
        bucket = s3.create_bucket()
        s3.filesystem().put(f"{base}/", f"{bucket}/base/", recursive=True)
        config = trainer_config(work, "s3", corpus, f"s3://{bucket}/base", 0.0)
        out = run_trainer(config, {**env, **s3.env}, "progress")
        out["gets"] = len([r for r in s3.requests() if r.key.startswith("base/")])
        out["files"] = len(list(base.iterdir()))
        out["copies"] = len(list((work / "node-cache" / "remote").glob("*/*.verified.json")))
        s3.delete_bucket(bucket)
        return out
    finally:
        s3.stop()


def report(r: dict[str, Any]) -> None:
    plan, stored = r["plan"], r["stored_bytes"]
    fixed = max(r["fixed"]["load_peak"])
    shard = 4 * plan["params"] / WORLD
    print(f"{plan['params'] / 1e9:.2f} B parameters, {stored / GIB:.2f} GiB of bf16 safetensors; "
          f"{WORLD} ranks, fsdp, fp32 master weights; fixed cost a rank {fixed / GIB:.2f} GiB; "
          f"a rank's fp32 shard {shard / GIB:.2f} GiB")
    rows = [("local", 1), ("reference", 2)] + ([("s3", 1)] if "s3" in r else [])
    for name, models in rows:
        peak = max(r[name]["load_peak"])
        limit = bound(fixed, plan["params"], plan["block_params"], models)
        loaded = r[name]["started"]["loadedBytes"]
        print(f"  {name:<10} load peak a rank {peak / GIB:.2f} GiB (bound {limit / GIB:.2f}: "
              f"{'within' if peak <= limit else 'ABOVE'}, {peak / limit:.2f} of it); read a rank "
              f"{', '.join(f'{b / stored:.3f}' for b in loaded)} of the files; "
              f"setup {r[name]['started']['setupSeconds']:.0f} s")
    load_peak = max(r["local"]["load_peak"])
    print(f"  planned a rank while loading {plan['loading'] / GIB:.2f} GiB, measured {load_peak / GIB:.2f} GiB "
          f"({plan['loading'] / load_peak:.2f}x); after one step {max(r['local']['end_peak']) / GIB:.2f} GiB "
          f"(the plan's training moment, {plan['training'] / GIB:.2f} GiB, adds the checkpoint staging and "
          "data worker of a run past its first checkpoint)")
    if "s3" in r:
        print(f"  s3: {r['s3'].get('copies', 1)} copy on the node, {r['s3']['gets']} GETs of the base's "
              f"{r['s3']['files']} files ({stored / GIB:.2f} GiB) for {WORLD} ranks: one download in "
              "s3fs's 50 MiB ranges")
    whole = r["whole"]
    print(f"  whole-model load (each rank before): {whole / GIB:.2f} GiB a rank, "
          f"{whole / max(r['local']['load_peak']):.2f}x the sharded load; {WORLD} ranks: "
          f"{WORLD * whole / GIB:.1f} GiB against {sum(r['local']['load_peak']) / GIB:.1f} GiB")


if __name__ == "__main__":
    sys.exit(main())
