"""A stand-in object store for tests/unit/data/test_source_reads.py: local files behind `gs://`
whose reads fail on demand, and one rank's side of the two-rank layout check (in a module of its
own so spawned processes can import it)."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cpt_api.spec import DataSource
from cpt_trainer.data import retries
from cpt_trainer.data.report import CurationReport
from cpt_trainer.data.retries import SourceReadError
from cpt_trainer.data.sources import SourceReader, read_layout


def parquet_source(uri: str) -> DataSource:
    return DataSource(name="s", role="domain", uri=uri, format="parquet", field="body")


class FlakyFS(LocalFileSystem):
    """Local files behind `gs://` (a scheme a spec may name), standing in for an object store
    whose reads fail: the first `failures[name]` opens of a file fail (-1: all)."""

    protocol = ("gs",)
    failures: dict[str, int] = {}

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        left = FlakyFS.failures.get(Path(path).name, 0)
        if left:
            FlakyFS.failures[Path(path).name] = left - 1 if left > 0 else -1
            raise ConnectionResetError(104, f"Connection reset by peer reading {path}")
        return super()._open(path, mode, **kwargs)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        # an object store lists ETags: the listing opens no file (local files are hashed instead)
        found = super().ls(path, detail=detail, **kwargs)
        return [self._etagged(i) for i in found] if detail else found

    def info(self, path: str, **kwargs: Any) -> Any:
        return self._etagged(super().info(path, **kwargs))

    @staticmethod
    def _etagged(info: dict[str, Any]) -> dict[str, Any]:
        return {**info, "ETag": f'"{info.get("size")}-{info.get("mtime")}"'}

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        return super()._strip_protocol(str(path).removeprefix("gs://"))


def rank_main(rank: int, world: int, init: str, uri: str, out: str) -> None:
    """Two readings of one source's layout through `distributed.from_rank0`: first with every
    read of rank 1's store failing, then with rank 0's. Writes what this rank ended with."""
    import torch.distributed as dist

    from cpt_trainer import distributed

    fsspec.register_implementation("gs", FlakyFS, clobber=True)
    retries.RETRY_DELAY_S = 0.01
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=10))
    try:
        for broken in (1, 0):
            FlakyFS.failures = {"part-0.parquet": -1, "part-1.parquet": -1} if rank == broken else {}
            try:
                layouts = distributed.from_rank0(lambda: [read_layout(parquet_source(uri))])
                reader = SourceReader(parquet_source(uri), CurationReport(), layout=layouts[0])
                got = repr((reader.hash, reader.units))
            except SourceReadError as exc:
                got = f"SourceReadError: {exc}"
            Path(out, f"rank{rank}-broken{broken}").write_text(got)
    finally:
        dist.destroy_process_group()
