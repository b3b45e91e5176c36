"""DataPipeline: sources -> curation -> tokenisation -> mixture -> packed batches.

Built once per trainer process. Construction reads this rank's shard of every source, curates
it (or loads it from the token cache) and writes the curation report; after that,
`next_batch` only tokenises ahead, samples and packs. Each window comes from one source, picked
by the mixture (`mixture.py`) and packed from that source's stream (`stream.py`,
`packing.py`), so every token of a window has the same source id and per-source losses and
token counts are exact. The curriculum position is the run's training tokens, i.e. this
rank's tokens times the world size (every rank takes equal batches).

The state (`state_dict`) is the mixture's draw counter and adaptive losses, every stream's
(epoch, document, token offset) and the per-source token counts: small, JSON-serialisable,
exact. Weights may change between attempts (replay override, curriculum, adaptive): each source
simply continues from its own position, so no data is skipped or repeated.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from cpt_operator.api.spec import Boundary, DataSource, MixtureStrategy
from cpt_operator.api.trainer_config import TrainerConfig

from .cache import TokenCache, default_root, to_store
from .curation import Curator, curation_key
from .mixture import Mixture, SourceWeights
from .packing import Batch, collate, pack_window
from .report import CurationReport
from .sources import SourceReader
from .stream import DocStore, SourceStream, TextStore
from .tokenizer_hash import tokenizer_hash

STATE_FORMAT = 1


class DataPipeline:
    def __init__(self, cfg: TrainerConfig, tokenizer: PreTrainedTokenizerBase, rank: int,
                 world_size: int, eval_texts: Sequence[str] = (), report_dir: str | None = None,
                 *, cache_root: str | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        data, packing = cfg.spec.data, cfg.spec.packing
        self.rank, self.world_size = rank, world_size
        self.source_names = [s.name for s in data.sources]
        self.roles = [s.role.value for s in data.sources]
        self._seq_len = packing.seq_len
        self._document_mask = packing.boundary == Boundary.document_mask
        self._tokenizer = tokenizer
        self._curator = Curator(data.curation, eval_texts)
        self._curation_key = curation_key(data.curation, eval_texts)
        self._cache_root = cache_root or default_root(cfg.run_dir)
        self._report = CurationReport()
        hashes, self._streams = {}, []
        for source in data.sources:
            hashes[source.name], store = self._load_source(source)
            self._streams.append(SourceStream(source.name, store, seed=data.seed, rank=rank))
        self.data_version = _data_version(cfg, hashes, self._curation_key)
        self._mixture = Mixture([_weights(s) for s in data.sources], strategy=data.strategy.value,
                                seed=data.seed, rank=rank, max_boost=data.adaptive_max_boost,
                                replay_delta=cfg.overrides.replay_delta)
        if data.strategy != MixtureStrategy.adaptive:
            self._mixture.max_boost = 1.0
        self._tokens = {name: 0 for name in self.source_names}
        if report_dir is not None:
            name = "curation.json" if rank == 0 else f"curation-rank{rank}.json"
            self._report.write(posixpath.join(report_dir, name))

    def _load_source(self, source: DataSource) -> tuple[str, DocStore]:
        """(content hash, documents of this rank) for one source, curated."""
        part = CurationReport()
        reader = SourceReader(source, self.rank, self.world_size, part)
        cache = TokenCache(self._cache_root, source_hash=reader.hash,
                           tokenizer_hash=tokenizer_hash(self._tokenizer),
                           curation_key=self._curation_key, rank=self.rank,
                           world_size=self.world_size) if source.cache else None
        cached = cache.load() if cache else None
        if cached:
            self._report.merge(cached[1])
            return reader.hash, cached[0]
        docs = self._curator.curate(reader.documents(), part)
        part.kept[source.name] = len(docs)
        self._report.merge(part.to_dict())
        store: DocStore = TextStore(docs, self._tokenizer)
        if cache:
            store = to_store(store.tokenized(range(len(store))))
            cache.save(store, part.to_dict())
        return reader.hash, store

    @property
    def tokens_seen(self) -> int:
        return sum(self._tokens.values())

    def _run_tokens(self) -> int:
        return self.tokens_seen * self.world_size

    def next_batch(self, batch_size: int) -> Batch:
        windows = []
        for _ in range(batch_size):
            name = self._mixture.next_source(self._run_tokens())
            index = self.source_names.index(name)
            windows.append(pack_window(self._streams[index], self._seq_len, self._document_mask,
                                       index))
            self._tokens[name] += self._seq_len
        return collate(windows)

    def report_losses(self, losses: Mapping[str, float]) -> None:
        self._mixture.report_losses(losses)

    def current_weights(self) -> dict[str, float]:
        return self._mixture.shares(self._run_tokens())

    def realised_proportions(self) -> dict[str, float]:
        total = self.tokens_seen
        return {n: (t / total if total else 0.0) for n, t in self._tokens.items()}

    def curation_report(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, **self._report.to_dict()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "data_version": self.data_version,
            "rank": self.rank, "world_size": self.world_size,
            "mixture": self._mixture.state_dict(), "tokens": dict(self._tokens),
            "streams": {s.name: s.state_dict() for s in self._streams},
        }

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Continue exactly where `state` was taken. strict refuses another data version or
        another sharding (their positions would point into different documents)."""
        if strict:
            self._check_compatible(state)
        self._mixture.load_state_dict(state["mixture"])
        self._tokens = {n: int(state["tokens"].get(n, 0)) for n in self.source_names}
        for stream in self._streams:
            if stream.name in state["streams"]:
                stream.load_state_dict(state["streams"][stream.name])

    def load_state_dicts(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Continue from the states of every rank of the run that saved (index = its rank)."""
        if len(states) != self.world_size:
            raise ValueError(f"data positions were saved by {len(states)} ranks; this pipeline "
                             f"has {self.world_size} and cannot re-deal them")
        self.load_state_dict(states[self.rank])

    def _check_compatible(self, state: Mapping[str, Any]) -> None:
        problems = []
        if state.get("format") != STATE_FORMAT:
            problems.append(f"state format {state.get('format')} (expected {STATE_FORMAT})")
        if state.get("data_version") != self.data_version:
            problems.append(f"data version {state.get('data_version')} != {self.data_version}")
        if (state.get("rank"), state.get("world_size")) != (self.rank, self.world_size):
            problems.append(f"rank {state.get('rank')}/{state.get('world_size')} != "
                            f"{self.rank}/{self.world_size}")
        if problems:
            raise ValueError("data state does not fit this pipeline: " + "; ".join(problems))


def _weights(source: DataSource) -> SourceWeights:
    points = tuple((p.tokens, p.weight) for p in source.schedule or ())
    return SourceWeights(source.name, source.role.value, source.weight, points)


def _data_version(cfg: TrainerConfig, hashes: dict[str, str], curation: str) -> str:
    """sha256 over what fixes the token stream: sources' content, curation, packing, seed."""
    spec = cfg.spec
    parts = {"sources": [[n, h] for n, h in hashes.items()], "curation": curation,
             "packing": spec.packing.dump(), "seed": spec.data.seed}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
