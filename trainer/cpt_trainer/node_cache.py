"""The node-local cache: copies of remote bases and verified checkpoints, one per node, and the
lock under which the processes of a node fill it."""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def node_cache(*parts: str) -> Path:
    """`$CPT_CACHE_DIR/<parts>` (default ~/.cache/cpt-operator): on a cluster an emptyDir or
    host path shared by the ranks of one pod."""
    root = Path(os.environ.get("CPT_CACHE_DIR", Path.home() / ".cache" / "cpt-operator"))
    return root.joinpath(*parts)


@contextmanager
def locked(path: str) -> Iterator[None]:
    """An exclusive lock among the processes of this node (a lock file next to the copy, so
    the copy's own files are only what was copied). A process waiting here waits for the one
    copying, however long that takes: no collective timeout runs out meanwhile."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
