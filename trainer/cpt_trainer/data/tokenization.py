"""Batched tokenisation of documents into the form packing consumes.

A document becomes `ids = tokens(prompt) + tokens(text) + [eos]` (no BOS: every document is
closed by EOS, which is what separates documents in a packed window, and that EOS is the only
special token a document ever holds) and `prompt_len`, the
number of leading tokens that never count in the loss. Prompt and text are tokenised apart so
the prompt / response boundary is a token boundary. Fast tokenizers encode a whole chunk of
documents in one call (Rust, parallel); slow ones go through the tokenizer's own batch call.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from .sources import Document


@dataclass(frozen=True)
class TokenizedDoc:
    ids: np.ndarray
    """uint32 token ids, EOS last."""
    prompt_len: int = 0


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; packing needs one to separate documents")
    return int(tokenizer.eos_token_id)


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens.

    A special token's *text* inside a document ("<|endoftext|>" in a scraped chat log or in
    tokenizer code) is encoded as ordinary text: otherwise it would become a real EOS in the
    middle of a document, a boundary the packer does not know about (inconsistent EOS)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return list(tokenizer(list(texts), add_special_tokens=False,
                              split_special_tokens=True)["input_ids"])
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        # encode_batch_fast skips offsets, which packing never needs.
        return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = previous


def tokenize_documents(tokenizer: PreTrainedTokenizerBase,
                       docs: Sequence[Document]) -> list[TokenizedDoc]:
    eos = eos_id(tokenizer)
    bodies = encode_texts(tokenizer, [d.text for d in docs])
    prompted = [i for i, d in enumerate(docs) if d.prompt]
    prompts = dict(zip(prompted, encode_texts(tokenizer, [docs[i].prompt for i in prompted])))
    out = []
    for i, body in enumerate(bodies):
        prompt = prompts.get(i, [])
        ids = np.empty(len(prompt) + len(body) + 1, dtype=np.uint32)
        ids[:len(prompt)] = prompt
        ids[len(prompt):-1] = body
        ids[-1] = eos
        out.append(TokenizedDoc(ids, len(prompt)))
    return out
