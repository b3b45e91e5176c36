"""A store that fails while a Parquet source is read: a failure that passes is retried and
loses nothing; one that persists fails loudly, naming the file, instead of turning a unit into
zero documents counted as done. A file that is not Parquet at all is still reported and skipped.
The listing and footers every rank cuts its units from are read once, on rank 0, and shared
(`distributed.from_rank0`), checked here with two gloo ranks; tests/e2e/test_data_s3.py runs the
same against the real S3 server behind a proxy that goes down."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch.multiprocessing as mp

from cpt_api.spec import DataSource
from cpt_trainer.data import retries
from cpt_trainer.data.report import CurationReport
from cpt_trainer.data.retries import SourceReadError
from cpt_trainer.data.sources import SourceReader, read_layout
from tests.unit.data.flaky_store import FlakyFS, parquet_source, rank_main

WORDS = Path("/usr/share/common-licenses/GPL-3").read_text().split()
TEXTS = [" ".join(WORDS[i * 20:(i + 1) * 20]) for i in range(12)]


@pytest.fixture(autouse=True)
def flaky(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import sys

    fsspec.register_implementation("gs", FlakyFS, clobber=True)
    FlakyFS.clear_instance_cache()
    FlakyFS.failures = {}
    monkeypatch.setattr(retries, "RETRY_DELAY_S", 0.01)
    yield
    sys.modules["fsspec.registry"]._registry.pop("gs", None)


def _parquet(root: Path, files: int = 2, groups: int = 2) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        chunk = TEXTS[i::files]
        pq.write_table(pa.table({"body": chunk}), root / f"part-{i}.parquet",
                       row_group_size=max(1, len(chunk) // groups))
    return f"gs://{root}/*.parquet"


def _source(uri: str) -> DataSource:
    return parquet_source(uri)


def test_a_store_that_fails_for_a_moment_loses_no_document(tmp_path: Path) -> None:
    source = _source(_parquet(tmp_path / "d"))
    FlakyFS.failures = {"part-0.parquet": 2}  # the footer's first two tries
    report = CurationReport()
    reader = SourceReader(source, report)
    assert len(reader.units) == 4  # both files' footers were read: 2 row groups each
    FlakyFS.failures = {"part-1.parquet": 3}  # a row group read fails three times
    assert sorted(d.text for d in reader.documents()) == sorted(TEXTS)
    assert report.to_dict()["filters"] == {}  # nothing skipped


def test_a_footer_the_store_never_serves_fails_naming_the_file(tmp_path: Path) -> None:
    source = _source(_parquet(tmp_path / "d"))
    FlakyFS.failures = {"part-1.parquet": -1}
    with pytest.raises(SourceReadError, match=r"part-1\.parquet \(Parquet footer\) after 4 tries: ConnectionReset"):
        read_layout(source)


def test_a_row_group_the_store_never_serves_fails_the_read_not_the_unit(tmp_path: Path) -> None:
    source = _source(_parquet(tmp_path / "d"))
    report = CurationReport()
    reader = SourceReader(source, report)
    FlakyFS.failures = {"part-0.parquet": -1}
    with pytest.raises(SourceReadError, match=r"part-0\.parquet \(Parquet row group 1\) after 4 tries"):
        list(reader.documents(reader.units[1]))
    FlakyFS.failures = {"part-0.parquet": 0}
    assert len(list(reader.documents(reader.units[1]))) == 3  # the unit is still there to read


def test_a_source_that_is_gone_fails_at_once_and_one_that_never_was_is_the_specs_fault(tmp_path: Path) -> None:
    source = _source(_parquet(tmp_path / "d"))
    reader = SourceReader(source, CurationReport())
    (tmp_path / "d" / "part-0.parquet").unlink()
    with pytest.raises(SourceReadError, match=r"cannot read .*part-0\.parquet \(Parquet row group 0\): FileNotFound"):
        list(reader.documents(reader.units[0]))
    with pytest.raises(FileNotFoundError):
        read_layout(_source(f"gs://{tmp_path}/absent/"))


def test_a_file_that_is_not_parquet_is_reported_and_skipped(tmp_path: Path) -> None:
    uri = _parquet(tmp_path / "d", files=1)
    (tmp_path / "d" / "part-9.parquet").write_text("this is not parquet, just text")
    report = CurationReport()
    reader = SourceReader(_source(uri), report)
    assert sorted(d.text for d in reader.documents()) == sorted(TEXTS)
    assert "not a readable Parquet file" in str(report.to_dict())


# -- one layout for every rank ----------------------------------------------------------------
def test_every_rank_cuts_its_units_from_rank_zeros_reading_and_shares_its_failure(tmp_path: Path) -> None:
    from tests.cluster.cluster import free_port

    uri, out = _parquet(tmp_path / "d"), tmp_path / "out"
    out.mkdir()
    ctx, init = mp.get_context("spawn"), f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=rank_main, args=(r, 2, init, uri, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"a rank exited {p.exitcode}"
    got = {f.name: f.read_text() for f in out.iterdir()}
    # rank 1's store fails every read: it reads nothing itself and has rank 0's unit map
    assert got["rank0-broken1"] == got["rank1-broken1"] and "Unit(file=1, start=1, end=2)" in got["rank0-broken1"]
    # rank 0's store fails: every rank fails with its reason, none waits for a layout
    assert got["rank0-broken0"] == got["rank1-broken0"]
    failed = got["rank1-broken0"]
    assert failed.startswith("SourceReadError: cannot read gs://") and "after 4 tries" in failed
