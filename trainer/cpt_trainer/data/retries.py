"""Reads of a source file that the store may fail to serve: tried again while the failure can
pass, then an error that names the file (`sources.py` reads listings, Parquet footers and row
groups through `with_retries`)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from ..store_errors import TRANSIENT as _TRANSIENT

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_TRIES = 4
"""Tries of one footer or row-group read before the attempt fails on it."""
RETRY_DELAY_S = 1.0
"""Wait before the second try; doubled before each further one (1 + 2 + 4 s in all): long
enough for a store's brief outage or a throttled burst, short enough that a store that is down
fails the attempt in seconds, leaving the retry to the control plane's restart policy."""
_PERSISTENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
"""I/O errors that another try would meet again."""




class SourceReadError(RuntimeError):
    """A source file the store could not serve, after READ_TRIES tries or at once when trying
    again cannot help (gone, access denied); the message names the file."""


def with_retries(what: str, read: Callable[[], T], *, passthrough: tuple[type[Exception], ...] = ()) -> T:
    """`read()`, tried again on I/O errors (`_TRANSIENT`); `passthrough` errors, and any other
    (a file that is not Parquet), are the caller's to handle, at once."""
    tries, delay_s = READ_TRIES, RETRY_DELAY_S
    for n in range(tries):
        try:
            return read()
        except passthrough:
            raise
        except _PERSISTENT as exc:
            raise SourceReadError(f"cannot read {what}: {type(exc).__name__}: {exc}") from exc
        except _TRANSIENT as exc:
            if n + 1 == tries:
                raise SourceReadError(f"cannot read {what} after {tries} tries: {type(exc).__name__}: {exc}") from exc
            log.warning("reading %s failed (try %d of %d, again in %.1f s): %s", what, n + 1, tries,
                        delay_s * 2 ** n, exc)
            time.sleep(delay_s * 2 ** n)
    raise AssertionError("unreachable")
