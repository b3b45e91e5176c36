"""Files that one process rewrites while another reads them (the pins the control plane writes
and the trainer's retention reads; the run record both claim) are replaced whole: a reader sees
the old content or the new, never an empty or half-written file."""
from __future__ import annotations

import threading
from pathlib import Path

from cpt_api import store
from cpt_api.ownership import RunRecord


def test_a_reader_never_sees_pins_half_written(tmp_path: Path) -> None:
    root = str(tmp_path / "checkpoints")
    sets = [[f"attempt-001/step-{s:08d}" for s in range(n, n + 50)] for n in range(0, 40, 4)]
    store.pin(root, sets[0])
    done, seen, errors = threading.Event(), set(), []

    def read() -> None:
        while not done.is_set():
            try:
                seen.add(tuple(sorted(store.pins(root).names)))
            except Exception as exc:  # noqa: BLE001  (what a reader would have crashed on)
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1500):
            store.pin(root, sets[i % len(sets)])
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert seen <= {tuple(sorted(s)) for s in sets} and len(seen) > 1
    assert [p.name for p in Path(root).iterdir()] == ["pinned.json"]  # no temporary left


def test_the_first_claim_writes_the_record_whole_and_later_claims_read_it(tmp_path: Path) -> None:
    root = str(tmp_path / "checkpoints")
    first = RunRecord(namespace="team", name="run-a", uid="uid-a")
    assert store.claim(root, first) == first
    assert store.claim(root, RunRecord(namespace="team", name="run-b", uid="uid-b")) == first
    assert store.owner(root) == first
