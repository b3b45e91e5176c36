"""The shape of a Llama-style decoder, and its parameter count, from the base's metadata alone.

The planner never loads weights: it reads the HF `config.json` keys or the GGUF header keys
(`<arch>.embedding_length`, ...) and counts parameters from the shape. What is counted, per
decoder layer: q/k/v/o projections (no biases), the gate/up/down MLP, two RMSNorm weights; once:
the token embedding, the final norm, and the output head unless it is tied to the embedding.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ShapeError(ValueError):
    """The metadata lacks a key the planner needs (named in the message)."""


@dataclass(frozen=True, slots=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def block_params(self) -> int:
        """One decoder layer: attention projections, SwiGLU MLP, two norms."""
        attention = self.hidden * (2 * self.q_dim + 2 * self.kv_dim)
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def root_params(self) -> int:
        """Outside the blocks: embedding, final norm and (untied) output head."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + self.hidden + head

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.root_params

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest single weight: the embedding (or head), else an MLP or the q
        projection's matrix."""
        return self.hidden * max(self.vocab, self.intermediate, self.q_dim)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a transformers `config.json` (Llama, Mistral, Qwen-style keys)."""
        hidden, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
        return cls(hidden=hidden, layers=_int(config, "num_hidden_layers"), heads=heads,
                   kv_heads=int(config.get("num_key_value_heads") or heads),
                   head_dim=int(config.get("head_dim") or hidden // heads),
                   intermediate=_int(config, "intermediate_size"), vocab=_int(config, "vocab_size"),
                   tied=bool(config.get("tie_word_embeddings", False)))

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any], vocab: int, tied: bool) -> ModelShape:
        """From GGUF header keys; `<arch>.` is `general.architecture` (llama, mistral, qwen2...)."""
        arch = str(fields.get("general.architecture") or "llama")
        key = {name: f"{arch}.{name}" for name in ("embedding_length", "block_count",
               "feed_forward_length", "attention.head_count", "attention.head_count_kv",
               "attention.key_length")}
        hidden, heads = _int(fields, key["embedding_length"]), _int(fields, key["attention.head_count"])
        return cls(hidden=hidden, layers=_int(fields, key["block_count"]), heads=heads,
                   kv_heads=int(fields.get(key["attention.head_count_kv"]) or heads),
                   head_dim=int(fields.get(key["attention.key_length"]) or hidden // heads),
                   intermediate=_int(fields, key["feed_forward_length"]), vocab=vocab, tied=tied)


def _int(fields: Mapping[str, Any], key: str) -> int:
    value = fields.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"model metadata has no positive integer {key!r} (found {value!r})")
    return value
