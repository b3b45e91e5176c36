"""Errors the trainer reports to a person instead of a traceback."""
from __future__ import annotations


class Refused(RuntimeError):
    """The configuration cannot work as given (wrong base, tokenizer or data version, an invalid
    checkpoint to restore from). The message says what differs and where each value came from.
    The process exits with code 2: retrying the same attempt cannot help."""
