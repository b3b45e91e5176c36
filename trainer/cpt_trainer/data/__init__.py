"""The data plane's input pipeline: sources, curation, mixture, tokenisation, packing.

The training loop needs only `DataPipeline` and `Batch` (call the model with
`model(**batch.model_inputs())`: that is what keeps packed documents apart, see packing.py);
`tokenizer_hash` binds the tokenizer to checkpoints and caches; `check_document_isolation`
asserts at start-up that the model really honours document boundaries.
"""
from .packing import Batch, check_document_isolation
from .pipeline import DataPipeline
from .tokenizer_hash import tokenizer_hash

__all__ = ["Batch", "DataPipeline", "check_document_isolation", "tokenizer_hash"]
