"""Read a base model's shape for the memory planner: its config.json or its GGUF header only.

Weights are never opened. `hf` bases and `checkpoint` directories (written by this system, with
the model's config.json at their top) are planned from `config.json`; `gguf` bases from the
header (see `gguf_header`). Paths and `s3://` URIs go through fsspec with the same storage
options as the trainer (`api.storage`).
"""
from __future__ import annotations

import json
import logging

import fsspec

from cpt_api.spec import BaseModelSpec, ModelFormat
from cpt_api.storage import storage_options, summarise_error
from .gguf_header import GgufArray, read_header
from .policy.model_shape import ModelShape

log = logging.getLogger(__name__)

READ_AHEAD = 4 << 20
"""fsspec block size for the GGUF header: one or two range reads for most vocabularies."""


class ShapeUnavailable(Exception):
    """The base's shape cannot be read (missing, unreadable or not a Llama-style decoder)."""


def read_shape(base: BaseModelSpec) -> ModelShape:
    """The base's decoder shape; ShapeUnavailable says what could not be read, and where."""
    where = base.uri if base.format == ModelFormat.gguf else config_uri(base)
    try:
        return _gguf_shape(base.uri) if base.format == ModelFormat.gguf else _hf_shape(where)
    except ShapeUnavailable:
        raise
    except Exception as exc:  # object stores raise their own error types; each means "no plan"
        # the store's own error text (endpoints, request ids) goes to the operator's log only;
        # what the file holds (not GGUF, a key missing) is the user's to see
        log.warning("cannot read %s: %s", where, exc)
        said = summarise_error(exc) if isinstance(exc, OSError) or hasattr(exc, "response") else str(exc)
        raise ShapeUnavailable(f"cannot read {where}: {said}") from exc


def config_uri(base: BaseModelSpec) -> str:
    return f"{base.uri.rstrip('/')}/config.json"


def _hf_shape(uri: str) -> ModelShape:
    with fsspec.open(uri, "rb", **storage_options(uri)) as f:
        return ModelShape.from_hf_config(json.load(f))


def _gguf_shape(uri: str) -> ModelShape:
    with fsspec.open(uri, "rb", block_size=READ_AHEAD, **storage_options(uri)) as f:
        header = read_header(f)
    tokens = header.fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, GgufArray):
        raise ShapeUnavailable(f"cannot read {uri}: the GGUF header has no tokenizer.ggml.tokens array")
    # GGUF has no tie flag: a tied head is simply absent (llama.cpp reuses token_embd.weight)
    return ModelShape.from_gguf(header.fields, vocab=tokens.length, tied="output.weight" not in header.tensors)
