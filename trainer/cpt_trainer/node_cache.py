"""The node-local cache: copies of remote bases and verified checkpoints, one per node."""
from __future__ import annotations

import os
from pathlib import Path


def node_cache(*parts: str) -> Path:
    """`$CPT_CACHE_DIR/<parts>` (default ~/.cache/cpt-operator): on a cluster an emptyDir or
    host path shared by the ranks of one pod."""
    root = Path(os.environ.get("CPT_CACHE_DIR", Path.home() / ".cache" / "cpt-operator"))
    return root.joinpath(*parts)
