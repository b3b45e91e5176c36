"""The data plane's input pipeline: sources, curation, mixture, tokenisation, packing.

The training loop needs only `DataPipeline` and `Batch`; `tokenizer_hash` binds the tokenizer
to checkpoints and caches.
"""
from .packing import Batch
from .pipeline import DataPipeline
from .tokenizer_hash import tokenizer_hash

__all__ = ["Batch", "DataPipeline", "tokenizer_hash"]
