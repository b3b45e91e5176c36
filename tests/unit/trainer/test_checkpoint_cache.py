"""The per-node cache of remote checkpoints (`checkpoint.fetch`), on fsspec's in-memory
filesystem: remote to `checkpoint`, so it takes the download-and-verify path."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from cpt_api import store
from cpt_api.manifest import Lineage, checkpoint_name
from cpt_trainer import checkpoint

LINEAGE = Lineage(run="r", attempt=1, parent=None, base_uri="base", restore_mode="weightsOnly",
                  data_version="d", tokenizer_hash="t", config_hash="c")


def write(root: str, files: dict[str, bytes], step: int = 3) -> str:
    """A committed checkpoint holding `files` (one of the same step goes first, as retention
    would delete it: a save never replaces a committed checkpoint)."""
    fs = fsspec.filesystem("memory")
    fs.rm(f"{root.removeprefix('memory://')}/{checkpoint_name(step)}", recursive=True) \
        if fs.exists(f"{root.removeprefix('memory://')}/{checkpoint_name(step)}") else None
    target = checkpoint.prepare(root, step)
    for rel, data in files.items():
        fs.pipe_file(f"{target}/{rel}", data)
    entries = {rel: store.file_digest(fs, f"{target}/{rel}") for rel in files}
    checkpoint.commit(root, step, 0, entries, LINEAGE, {}, None, True)
    return f"memory://{target}"


@pytest.fixture
def root(tmp_path, monkeypatch) -> Iterator[str]:
    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path))
    yield f"memory://ckpt-{tmp_path.name}"
    fsspec.filesystem("memory").rm(f"/ckpt-{tmp_path.name}", recursive=True)


def cached(uri: str, rel: str) -> bytes:
    return Path(checkpoint.local_path(uri), rel).read_bytes()


def test_a_checkpoint_written_again_under_the_same_uri_is_downloaded_again(root):
    uri = write(root, {"config.json": b"{}", "model/__0_0.distcp": b"old weights"})
    assert checkpoint.fetch(uri) == [] and cached(uri, "model/__0_0.distcp") == b"old weights"
    write(root, {"config.json": b"{}", "model/__0_0.distcp": b"new weights"})  # same size
    assert checkpoint.fetch(uri) == []
    assert cached(uri, "model/__0_0.distcp") == b"new weights"


def test_a_corrupt_download_is_refused_and_not_recorded(root, monkeypatch):
    uri = write(root, {"config.json": b"{}", "model/__0_0.distcp": b"weights"})
    real = MemoryFileSystem.get_file

    def flip(self, rpath, lpath, **kw):
        real(self, rpath, lpath, **kw)
        if rpath.endswith(".distcp"):
            Path(lpath).write_bytes(b"WEIGHTS")

    monkeypatch.setattr(MemoryFileSystem, "get_file", flip)
    problems = checkpoint.fetch(uri)
    assert len(problems) == 1 and problems[0].startswith("model/__0_0.distcp sha256")
    assert not Path(checkpoint.local_path(uri) + ".verified.json").exists()


def test_a_save_never_replaces_a_committed_checkpoint(root):
    uri = write(root, {"config.json": b"{}", "model/__0_0.distcp": b"weights"})
    with pytest.raises(checkpoint.CheckpointExists, match="never replaces"):
        checkpoint.prepare(root, 3)
    assert checkpoint.problems_of(uri)[1] == []  # untouched, still valid
    fs = fsspec.filesystem("memory")
    partial = f"{root.removeprefix('memory://')}/{checkpoint_name(4)}"
    fs.pipe_file(f"{partial}/model/__0_0.distcp", b"half a save")  # no manifest: not a checkpoint
    assert checkpoint.prepare(root, 4).endswith(partial) and fs.ls(partial) == []
