"""The tokenizer's identity: one hash bound to checkpoints, caches and evaluations.

sha256 over the backend tokenizer's full JSON serialisation (model, vocabulary, merges,
normaliser, pre-tokeniser, added tokens) plus the special-token map, so any change that can
alter a token id or the EOS used for packing gives a different hash. Slow (Python) tokenizers
have no such serialisation; their sorted vocabulary stands in for it.
"""
from __future__ import annotations

import hashlib
import json

from transformers import PreTrainedTokenizerBase


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    digest.update(json.dumps(special, sort_keys=True).encode())
    return digest.hexdigest()
