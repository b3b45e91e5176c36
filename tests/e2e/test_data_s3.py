"""The data pipeline against a real S3 server (versitygw): the same code path as local files.

The trainer gets the endpoint and credentials the way any AWS client does, from the standard
environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION), so the spec holds only `s3://bucket/...` URIs and no secrets; in a pod
they come from a Secret through `env`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cpt_operator.api.trainer_config import TrainerConfig
from cpt_trainer.data import DataPipeline

pytestmark = [pytest.mark.s3, pytest.mark.timeout(180)]

WORDS = Path("/usr/share/common-licenses/GPL-3").read_text().split()


def _config(tmp_path: Path, bucket: str) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "run": "s3-data", "runDir": str(tmp_path / "run"),
        "checkpointUri": str(tmp_path / "run" / "checkpoints"),
        "spec": {
            "baseModel": {"uri": "unused"},
            "data": {"sources": [
                {"name": "legal", "role": "domain", "format": "jsonl", "weight": 0.8,
                 "uri": f"s3://{bucket}/corpus/legal/*.jsonl"},
                {"name": "general", "role": "replay", "format": "jsonl", "weight": 0.2,
                 "uri": f"s3://{bucket}/corpus/general/"}],
                "curation": {"dedupe": "exact", "minChars": 20, "decontaminate": False}},
            "packing": {"seqLen": 64, "boundary": "documentMask"},
            "budget": {"steps": 10}, "schedule": {"warmupSteps": 0},
        },
    })


def _put_corpus(client: Any, bucket: str) -> dict[str, list[str]]:
    texts = {"legal": [" ".join(WORDS[i:i + 40]) for i in range(0, 1200, 40)],
             "general": [f"General note {i}: the weather was mild and the trains ran on time."
                         for i in range(12)]}
    for name, docs in texts.items():
        for part in range(3):
            body = "".join(json.dumps({"text": t}) + "\n" for t in docs[part::3])
            client.put_object(Bucket=bucket, Key=f"corpus/{name}/part-{part}.jsonl",
                              Body=body.encode())
    client.put_object(Bucket=bucket, Key="corpus/legal/README.md", Body=b"not matched")
    return texts


def _unit_documents(pipe: DataPipeline, source: str, rank: int, world: int) -> list[str]:
    """The documents of the units rank `rank` of `world` owns in epoch 0 of a source."""
    reader = pipe._core.plan.readers[pipe.source_names.index(source)]
    mine = range(rank, len(reader.units), world)
    return [d.text for q in mine for d in reader.documents(reader.units[q])]


def test_pipeline_reads_s3_with_endpoint_and_credentials_from_the_environment(
        s3_server: Any, s3_bucket: str, tmp_path: Path, tiny_model_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    client = s3_server.client()
    texts = _put_corpus(client, s3_bucket)
    cfg = _config(tmp_path, s3_bucket)

    # Byte-range units of the S3 objects: two ranks read disjoint units that together hold the
    # whole corpus, each object only in the ranges it owns.
    pipes = [DataPipeline(cfg, tokenizer, rank, 2, report_dir=f"s3://{s3_bucket}/runs/r",
                          workers=0, unit_bytes=512) for rank in range(2)]
    assert pipes[0].data_version == pipes[1].data_version
    for source in ("legal", "general"):
        shares = [_unit_documents(pipes[0], source, r, 2) for r in range(2)]
        assert sorted(shares[0] + shares[1]) == sorted(texts[source])
        assert not set(shares[0]) & set(shares[1])
    reader = pipes[0]._core.plan.readers[0]
    assert len(reader.units) > 3 and all(f.path.startswith(f"s3://{s3_bucket}/corpus/legal/")
                                         and f.path.endswith(".jsonl") for f in reader.files)

    batch = pipes[0].next_batch(4)
    assert batch.input_ids.shape == (4, 64) and batch.num_tokens > 0
    assert torch.equal(DataPipeline(cfg, tokenizer, 0, 2, workers=0, unit_bytes=512)
                       .next_batch(4).input_ids, batch.input_ids)
    report = json.loads(client.get_object(Bucket=s3_bucket, Key="runs/r/curation.json")["Body"]
                        .read())
    assert report["read"]["legal"] > 0

    # Rewriting one object changes its ETag, hence the data version.
    client.put_object(Bucket=s3_bucket, Key="corpus/general/part-0.jsonl",
                      Body=(json.dumps({"text": "A replaced general note, long enough."})
                            + "\n").encode())
    changed = DataPipeline(cfg, tokenizer, 0, 2, workers=0, unit_bytes=512)
    assert changed.data_version != pipes[0].data_version


def test_a_producer_in_its_forked_worker_reads_s3_like_one_in_the_trainer(
        s3_server: Any, s3_bucket: str, tmp_path: Path, tiny_model_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's producer runs in a DataLoader worker forked from the trainer, which has
    already listed the sources; s3fs refuses to run in a forked child with its parent's
    filesystem object ("This class is not fork-safe"), so the worker must open its own."""
    from transformers import AutoTokenizer

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    _put_corpus(s3_server.client(), s3_bucket)
    cfg = _config(tmp_path, s3_bucket)
    forked = DataPipeline(cfg, tokenizer, 0, 1, workers=1, unit_bytes=512)
    try:
        batches = [forked.next_batch(4).input_ids for _ in range(3)]
    finally:
        forked.close()
    here = DataPipeline(cfg, tokenizer, 0, 1, workers=0, unit_bytes=512)
    assert all(torch.equal(b, here.next_batch(4).input_ids) for b in batches)
