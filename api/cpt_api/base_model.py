"""The base model a run starts from and the tokenizer it reads its text with.

Both are only ever read: the base is named by a URI (an HF directory, a .gguf file or a checkpoint
this system wrote) and checked by digest, so a run cannot silently continue from the wrong
weights. Part of the CptRun spec (`cpt_api.spec` assembles the sections).
"""
from __future__ import annotations

from enum import Enum

from pydantic import Field, model_validator

from .base import SpecModel
from .storage import URI_PATTERN


class ModelFormat(str, Enum):
    hf = "hf"
    gguf = "gguf"
    checkpoint = "checkpoint"


class RestoreMode(str, Enum):
    weights_only = "weightsOnly"
    full_state = "fullState"


class BaseModelSpec(SpecModel):
    uri: str = Field(min_length=1, max_length=4096, pattern=URI_PATTERN)
    """Where the base model lives: an HF model directory, a .gguf file, or a cpt checkpoint
    directory (any fsspec URL). It is only ever read."""
    format: ModelFormat = ModelFormat.hf
    """`hf` (config.json + safetensors), `gguf` (dequantised on load) or `checkpoint` (a
    checkpoint written by this system, needed for fullState restore)."""
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """Expected digest of the base's weights; a mismatch refuses to start (wrong base)."""
    restore_mode: RestoreMode = RestoreMode.weights_only
    """weightsOnly: a new experiment (fresh optimizer, new warm-up). fullState: continue the
    trajectory of a checkpoint (optimizer, schedule, RNG, data position)."""
    import_checkpoint: bool = False
    """The base is a checkpoint another run wrote (its root's run.json names that run): start
    from it. Without this such a base is refused, so naming a URI is not enough to read another
    run's weights."""

    @model_validator(mode="after")
    def _full_state_needs_checkpoint(self) -> "BaseModelSpec":
        if self.restore_mode == RestoreMode.full_state and self.format != ModelFormat.checkpoint:
            raise ValueError(
                "restoreMode fullState needs format 'checkpoint' (optimizer and data state exist "
                "only in checkpoints written by this system); use weightsOnly for hf/gguf bases"
            )
        if self.import_checkpoint and self.format != ModelFormat.checkpoint:
            raise ValueError("importCheckpoint needs format 'checkpoint'")
        return self


class TokenizerExtensionSpec(SpecModel):
    terms: list[str] = Field(default_factory=list, max_length=100_000)
    """Domain terms to add as single tokens."""
    top_k: int | None = Field(default=None, ge=1, le=100_000)
    """Add the K terms whose extension saves most context, found by analysing the domain data."""
    oversample_steps: int = Field(default=0, ge=0)
    """For this many steps, windows containing new tokens are sampled more often."""
    oversample_factor: float = Field(default=2.0, ge=1.0, le=16.0)
    """How much more often such windows are kept during the oversampling warm-up."""


class TokenizerSpec(SpecModel):
    uri: str | None = Field(default=None, max_length=4096, pattern=URI_PATTERN)
    """Tokenizer location; empty means the base model's own tokenizer."""
    version: str | None = None
    """Expected tokenizer hash (sha256 of its serialised vocabulary); a mismatch is refused."""
    extend: TokenizerExtensionSpec | None = None
