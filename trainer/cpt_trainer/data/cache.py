"""The pre-tokenised cache: tokenise a source once, reuse it in every later attempt and run.

Layout (any fsspec URL):
    <root>/<source_hash[:16]>-<tokenizer_hash[:16]>/<curation_key[:16]>/part-RRRRR-of-WWWWW/
        ids.npy          uint32, every kept document's tokens (EOS included), concatenated
        offsets.npy      int64, document i is ids[offsets[i]:offsets[i+1]]
        prompt_lens.npy  int32, leading prompt tokens per document (masked out of the loss)
        report.json      the curation report of this part (so a cache hit still reports)
        DONE             written last, holding the full keys: a part without it is ignored
The key is the source's content hash and the tokenizer hash, so a changed file or a different
tokenizer misses the cache rather than reading stale ids; the curation key (settings plus eval
texts) and the rank / world size pick the part, because a part holds one rank's curated shard.
The default root is `token-cache/` beside the run directory, shared by the runs under it.
"""
from __future__ import annotations

import io
import json
import posixpath
from typing import Any

import numpy as np

from .sources import open_fs
from .stream import TokenStore
from .tokenization import TokenizedDoc

_ARRAYS = ("ids", "offsets", "prompt_lens")


def default_root(run_dir: str) -> str:
    parent = run_dir.rstrip("/").rsplit("/", 1)[0] if "/" in run_dir.rstrip("/") else "."
    return posixpath.join(parent, "token-cache")


def to_store(docs: list[TokenizedDoc]) -> TokenStore:
    lengths = np.array([len(d.ids) for d in docs], dtype=np.int64)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([d.ids for d in docs]) if docs else np.zeros(0, dtype=np.uint32)
    return TokenStore(ids, offsets, np.array([d.prompt_len for d in docs], dtype=np.int32))


class TokenCache:
    def __init__(self, root: str, *, source_hash: str, tokenizer_hash: str, curation_key: str,
                 rank: int, world_size: int):
        self.keys = {"source": source_hash, "tokenizer": tokenizer_hash, "curation": curation_key,
                     "rank": rank, "world_size": world_size}
        self.url = posixpath.join(root, f"{source_hash[:16]}-{tokenizer_hash[:16]}",
                                  curation_key[:16], f"part-{rank:05d}-of-{world_size:05d}")
        self.fs, self.path = open_fs(self.url)

    def _file(self, name: str) -> str:
        return posixpath.join(self.path, name)

    def load(self) -> tuple[TokenStore, dict[str, Any]] | None:
        """The cached store and its curation report, or None when this part is not complete."""
        if not self.fs.exists(self._file("DONE")):
            return None
        with self.fs.open(self._file("DONE"), "r") as f:
            if json.load(f) != self.keys:  # a 16-hex prefix collision, however unlikely
                return None
        arrays = [self._load_array(name) for name in _ARRAYS]
        with self.fs.open(self._file("report.json"), "r") as f:
            report = json.load(f)
        return TokenStore(*arrays), report

    def _load_array(self, name: str) -> np.ndarray:
        path = self._file(f"{name}.npy")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        array: np.ndarray
        if "file" in protocols:
            array = np.load(path, mmap_mode="r")  # local: map, do not read
        else:
            with self.fs.open(path, "rb") as f:
                array = np.load(io.BytesIO(f.read()))
        return array

    def save(self, store: TokenStore, report: dict[str, Any]) -> None:
        self.fs.makedirs(self.path, exist_ok=True)
        for name, array in zip(_ARRAYS, (store.ids, store.offsets, store.prompt_lens)):
            buffer = io.BytesIO()
            np.save(buffer, array)
            with self.fs.open(self._file(f"{name}.npy"), "wb") as f:
                f.write(buffer.getvalue())
        with self.fs.open(self._file("report.json"), "w") as f:
            json.dump(report, f)
        with self.fs.open(self._file("DONE"), "w") as f:  # last: the commit point
            json.dump(self.keys, f)
