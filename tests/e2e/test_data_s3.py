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
from cpt_trainer.data import DataPipeline, tokenization

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
                 "uri": f"s3://{bucket}/corpus/legal/*.jsonl", "cache": True},
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
    cache_root = f"s3://{s3_bucket}/token-cache"

    # Two ranks read disjoint shards that together are the whole corpus.
    pipes = [DataPipeline(cfg, tokenizer, rank, 2, report_dir=f"s3://{s3_bucket}/runs/r",
                          cache_root=cache_root) for rank in range(2)]
    legal = [pipe._streams[pipe.source_names.index("legal")].store for pipe in pipes]
    cached = sorted(tuple(store.ids[store.offsets[i]:store.offsets[i + 1] - 1].tolist())
                    for store in legal for i in range(len(store)))  # the cached source: ids
    assert cached == sorted(tuple(tokenizer(t, add_special_tokens=False)["input_ids"])
                            for t in texts["legal"])
    general = [pipe._streams[pipe.source_names.index("general")].store for pipe in pipes]
    assert sorted(d.text for store in general for d in store.docs) == sorted(texts["general"])
    assert all(d.origin.file.startswith(f"s3://{s3_bucket}/") for d in general[0].docs)
    assert pipes[0].data_version == pipes[1].data_version
    report = json.loads(client.get_object(Bucket=s3_bucket, Key="runs/r/curation.json")["Body"]
                        .read())
    assert report["read"] == {"legal": 15, "general": 6}

    batch = pipes[0].next_batch(4)
    assert batch.input_ids.shape == (4, 64) and batch.num_tokens > 0

    # The token cache lives in the bucket too: a new process-equivalent reuses it.
    assert any(key.endswith("/DONE") for key in _keys(client, s3_bucket, "token-cache/"))
    encoded: list[int] = []
    real_encode = tokenization.encode_texts
    monkeypatch.setattr(tokenization, "encode_texts",
                        lambda tok, batch: encoded.append(len(batch)) or real_encode(tok, batch))
    again = DataPipeline(cfg, tokenizer, 0, 2, cache_root=cache_root)
    assert encoded == []  # construction tokenised nothing: the legal shard came from S3
    assert torch.equal(again.next_batch(4).input_ids, batch.input_ids)

    # Rewriting one object changes its ETag, hence the data version.
    client.put_object(Bucket=s3_bucket, Key="corpus/general/part-0.jsonl",
                      Body=(json.dumps({"text": "A replaced general note, long enough."})
                            + "\n").encode())
    changed = DataPipeline(cfg, tokenizer, 0, 2, cache_root=cache_root)
    assert changed.data_version != pipes[0].data_version


def _keys(client: Any, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]
