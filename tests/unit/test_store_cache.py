"""Listing a run's checkpoints again reads only manifests it has not read: a manifest is
immutable once written, but the listing that finds new checkpoints (and loses deleted ones)
is redone every time."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from cpt_api.manifest import FileEntry, Lineage, Manifest
from cpt_api.store import list_checkpoints


def write(root: Path, step: int) -> None:
    path = root / "attempt-001" / f"step-{step:08d}"
    path.mkdir(parents=True)
    payload = b"x" * step
    (path / "model.bin").write_bytes(payload)
    manifest = Manifest(step=step, tokens=step, created_at="2026-01-01T00:00:00Z",
                        lineage=Lineage(run="r", attempt=1, parent=None, base_uri="/m", restore_mode="weightsOnly",
                                        data_version="d", tokenizer_hash="t", config_hash="c"),
                        files={"model.bin": FileEntry(size=len(payload), sha256=hashlib.sha256(payload).hexdigest())})
    (path / "manifest.json").write_text(manifest.model_dump_json(by_alias=True))


def test_known_checkpoints_are_not_read_again_new_ones_are_and_deleted_ones_drop(tmp_path: Path) -> None:
    write(tmp_path, 10)
    first, _ = list_checkpoints(str(tmp_path))
    # had it been read again, this manifest would now be unreadable
    (tmp_path / "attempt-001" / "step-00000010" / "manifest.json").write_text("{")
    write(tmp_path, 20)
    known = {r.name: r for r in first}
    again, problems = list_checkpoints(str(tmp_path), known=known)
    assert [r.name for r in again] == ["attempt-001/step-00000010", "attempt-001/step-00000020"]
    assert again[0] is first[0] and problems == []
    assert list_checkpoints(str(tmp_path))[1]  # a fresh listing does read it

    shutil.rmtree(tmp_path / "attempt-001" / "step-00000010")  # retention
    assert [r.name for r in list_checkpoints(str(tmp_path), known=known)[0]] == ["attempt-001/step-00000020"]
