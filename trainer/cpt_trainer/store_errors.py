"""What a store's failed read raises when another try may succeed: OSError (the kernel, pyarrow,
s3fs's translation of the store's answers) and, from s3fs, botocore's own errors that are not
OSErrors: a connection refused for longer than botocore retries by itself (~5 s), and a body
whose checksum does not match (a transfer cut short, or an object replaced while it was read, as
an S3 server without atomic overwrites serves it)."""
from __future__ import annotations


def _transient_errors() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import (ConnectionError as BotoConnectionError, FlexibleChecksumError,
                                         HTTPClientError, IncompleteReadError)
        kinds += [BotoConnectionError, HTTPClientError, FlexibleChecksumError, IncompleteReadError]
    except ImportError:  # no S3 support installed: nothing raises them
        pass
    return tuple(kinds)


TRANSIENT = _transient_errors()

__all__ = ["TRANSIENT"]
