"""Per-rank data sharding: bytes each of 4 ranks reads, and data time per batch.

A corpus of ~30 MB (JSONL records and text files made from the license texts and the Python
standard library) is read by 4 rank pipelines in this one process (in-process producers, so
the time is the producer's own: read, curate, tokenise, mix, pack). Each rank runs until it
has finished its positions of epoch 0 in every source; the figure is the bytes its readers
pulled (their own counters) before the batch that left epoch 0 of each source, as a fraction
of the corpus, target 1/4 ± 10 %. Listing-time hashing of
local files (the data version's fingerprint; object stores give ETags instead) is not
counted: it is the same on every rank and is not document reading.

    python bench/bench_data_shard.py         # writes bench/results/data_shard.json
"""
from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_data import train_tokenizer  # noqa: E402

from cpt_api.trainer_config import TrainerConfig  # noqa: E402
from cpt_trainer.data import DataPipeline  # noqa: E402

WORLD = 4


def write_corpus(root: Path, jsonl_mb: int, text_files: int) -> int:
    """JSONL shards of stdlib modules (repeated with a serial, to reach the size) and text
    files of license paragraphs; returns the corpus size in bytes."""
    stdlib = [p.read_text(errors="replace")
              for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))]
    (root / "code").mkdir(parents=True)
    (root / "prose").mkdir()
    written, shard, serial = 0, 0, 0
    while written < jsonl_mb << 20:
        with open(root / "code" / f"{shard:03d}.jsonl", "w") as f:
            # Records of ~4 KB (a web-scale corpus's typical document), not whole modules:
            # a range also reads the tail of the line in progress where it starts.
            for text in (t[i:i + 4000] for t in stdlib[shard % 7::7] for i in range(0, len(t), 4000)):
                line = json.dumps({"text": f"# copy {serial}\n{text}"}) + "\n"
                f.write(line)
                written, serial = written + len(line), serial + 1
        shard += 1
    licenses = [p.read_text(errors="replace") for p in sorted(Path("/usr/share/common-licenses")
                                                                .glob("*")) if p.is_file()]
    for i in range(text_files):
        (root / "prose" / f"{i:04d}.txt").write_text(f"Copy {i}.\n" + licenses[i % len(licenses)])
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def config(root: Path, seq_len: int, code_share: float) -> TrainerConfig:
    sources = [{"name": "code", "role": "domain", "uri": str(root / "code" / "*.jsonl"),
                "format": "jsonl", "weight": code_share},
               {"name": "prose", "role": "replay", "uri": str(root / "prose" / "*.txt"),
                "weight": 1 - code_share}]
    return TrainerConfig.model_validate({
        "run": "bench", "runDir": str(root / "run"), "checkpointUri": str(root / "ck"),
        "spec": {"baseModel": {"uri": "unused"}, "packing": {"seqLen": seq_len},
                 "data": {"sources": sources, "curation": {"dedupe": "exact"}},
                 "budget": {"steps": 10}, "schedule": {"warmupSteps": 0}}})


def past_epoch0(stream) -> bool:
    return (stream.queue[0][0] if stream.queue else stream.next) >= stream.unit_count


def run_rank(cfg: TrainerConfig, tokenizer, rank: int, batch: int,
             unit_bytes: int) -> dict[str, float]:
    pipe = DataPipeline(cfg, tokenizer, rank, WORLD, workers=0, unit_bytes=unit_bytes)
    batches, start, read = 0, time.perf_counter(), {}
    while len(read) < len(pipe.source_names):
        before = {s.name: s.reader.bytes_read for s in pipe._core.streams}
        pipe.next_batch(batch)
        batches += 1
        # A source's bytes are taken as they stood before the batch that left epoch 0 (that
        # batch opens an epoch-1 unit and reads its first chunk, ~a whole 1 MiB unit).
        read.update({s.name: before[s.name] for s in pipe._core.streams
                     if s.name not in read and past_epoch0(s)})
    seconds = time.perf_counter() - start
    return {"bytes": sum(read.values()), "batches": batches,
            "ms_per_batch": 1000 * seconds / batches,
            "units": sum(len(s.reader.units) for s in pipe._core.streams)}


def measure(*, jsonl_mb: int, text_files: int, unit_bytes: int, seq_len: int,
            batch: int) -> dict:
    """Build the corpus, run the 4 rank pipelines, return the figures (bench_scale.py calls
    this too)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_corpus(root, jsonl_mb, text_files)
        code = sum(p.stat().st_size for p in (root / "code").glob("*"))
        sample = [p.read_text() for p in sorted((root / "prose").glob("*"))[:20]]
        tokenizer = train_tokenizer(sample, root / "tok", 8192)
        # Weights in proportion to size, so both sources finish epoch 0 at about one time.
        cfg = config(root, seq_len, code / corpus)
        ranks = [run_rank(cfg, tokenizer, r, batch, unit_bytes) for r in range(WORLD)]
    shares = [r["bytes"] / corpus for r in ranks]
    for r, (rank, share) in enumerate(zip(ranks, shares)):
        print(f"rank {r}: read {rank['bytes'] / 2**20:6.1f} MiB = {share:.3f} of the corpus, "
              f"{rank['batches']} batches, {rank['ms_per_batch']:.1f} ms/batch")
    print(f"corpus {corpus / 2**20:.1f} MiB in {ranks[0]['units']} units; target 0.25 ± 10 %")
    return {"corpus_bytes": corpus, "world_size": WORLD, "unit_bytes": unit_bytes,
            "units": ranks[0]["units"], "seq_len": seq_len, "batch": batch,
            "ranks": ranks, "share_of_corpus": shares,
            "within_target": all(abs(s - 0.25) <= 0.025 for s in shares)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jsonl-mb", type=int, default=24)
    parser.add_argument("--text-files", type=int, default=300)
    parser.add_argument("--unit-bytes", type=int, default=1 << 20)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_shard.json"))
    args = parser.parse_args()
    result = measure(jsonl_mb=args.jsonl_mb, text_files=args.text_files,
                     unit_bytes=args.unit_bytes, seq_len=args.seq_len, batch=args.batch)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
