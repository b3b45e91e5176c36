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

from cpt_api.trainer_config import TrainerConfig
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


# -- an S3 outage while the trainer reads a Parquet source --------------------------------------
def _parquet_corpus(client: Any, bucket: str) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [" ".join(WORDS[i:i + 40]) for i in range(0, 2400, 40)]
    for part in range(3):
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": docs[part::3]}), buf, row_group_size=5)
        client.put_object(Bucket=bucket, Key=f"corpus/parquet/part-{part}.parquet", Body=buf.getvalue())


@pytest.fixture
def s3_proxy(s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.cluster.cluster import Toxiproxy
    from tests.e2e.fixtures import _ensure

    _ensure(["toxiproxy"])
    proxy = Toxiproxy(tmp_path_factory.mktemp("toxiproxy")).start()
    try:
        proxy.listen = proxy.proxy("s3", s3_server.endpoint.removeprefix("http://"))
        yield proxy
    finally:
        proxy.stop()


@pytest.mark.timeout(300)
def test_two_ranks_ride_out_an_s3_outage_on_a_parquet_source_and_fail_on_one_that_lasts(
        s3_server: Any, s3_bucket: str, s3_proxy: Any, tmp_path: Path, tiny_model_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The real trainer on 2 gloo ranks, its S3 behind a proxy that is down when it starts
    (connections refused, for longer than botocore retries by itself). Rank 0 lists the source
    and reads its Parquet footers for both ranks, retrying; brought back after the first retry,
    the run trains on every row. Left down, both ranks fail with the source named, in seconds."""
    import time

    from tests.integration.harness import events, log_tail, of, start, tiny_spec, write_config

    _parquet_corpus(s3_server.client(), s3_bucket)
    proxied = f"http://{s3_proxy.listen}"
    # botocore's own retries (standard mode, 2 attempts: about a second) come first; the outage
    # outlasts them, so what rides it out is the trainer's retry
    for key, value in {**s3_server.env, "AWS_ENDPOINT_URL": proxied, "AWS_ENDPOINT_URL_S3": proxied,
                       "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "2"}.items():
        monkeypatch.setenv(key, value)
    source = {"name": "legal", "role": "domain", "format": "parquet", "uri": f"s3://{s3_bucket}/corpus/parquet/"}
    spec = tiny_spec(tiny_model_dir, {"domain": tmp_path, "replay": tmp_path}, data={"sources": [source]},
                     budget={"steps": 3}, checkpoint={"every": 3},
                     training={"microBatchSize": 2, "gradAccumulation": 1})
    figures = {}
    for outage, attempt in (("brief", 1), ("lasting", 2)):
        config = write_config(tmp_path, spec, attempt=attempt)
        s3_proxy.set_enabled("s3", False)
        began = time.monotonic()
        proc = start(config, nproc=2)
        try:
            deadline = began + 120
            while "failed (try 1 of 4" not in log_tail(config):
                assert time.monotonic() < deadline and proc.poll() is None, log_tail(config)
                time.sleep(0.2)
            if outage == "brief":
                s3_proxy.set_enabled("s3", True)
            code = proc.wait(timeout=150)
        finally:
            s3_proxy.set_enabled("s3", True)
            if proc.poll() is None:
                proc.kill()
        figures[outage] = round(time.monotonic() - began, 1)
        finished = of("finished", events(config))
        log = (config.parent / "trainer.log").read_text(errors="replace")
        if outage == "brief":
            assert code == 0, log[-3000:]
            assert finished and finished[-1].reason == "budget"
            reports = [json.loads(p.read_text()) for p in config.parent.glob("curation*.json")]
            assert len(reports) == 2 and all(r["read"]["legal"] > 0 and "bad_input" not in r["filters"]
                                             for r in reports)  # no row group was lost to the outage
        else:
            assert code != 0 and finished and finished[-1].reason == "error", log[-3000:]
            assert f"SourceReadError: cannot read the listing of s3://{s3_bucket}/corpus/parquet/ after 4 tries" \
                in finished[-1].message
            assert log.count("SourceReadError: cannot read the listing") >= 2  # each rank says why
    print(f"S3 outage on a Parquet source, 2 ranks: recovered run {figures['brief']} s, "
          f"lasting outage failed in {figures['lasting']} s")
