"""Host memory: give the memory of freed tensors back to the operating system.

glibc serves an allocation above its mmap threshold with its own mapping, unmapped on free, and a
smaller one from a heap that keeps freed memory for reuse. The threshold moves: each freed
mapping raises it to that size, up to 32 MiB. After the first large free, a training step's
activations and gradients (a few MiB each) come from the heap, and what a step or an evaluation
frees stays resident, where the next large allocation (logits, mapped again) cannot reuse it.
On the demo (SmolLM2-135M on CPU) that was 1.5 GiB of a 8.5 GiB peak. A fixed threshold stops
the adjustment, so tensors of a MiB or more are always mapped and returned when freed.
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
THRESHOLD_BYTES = 1 << 20


def fix_mmap_threshold(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process (before torch allocates). False where malloc
    is not glibc's, or when MALLOC_MMAP_THRESHOLD_ in the environment already decides it."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if not ok:
        log.warning("could not fix the malloc mmap threshold: freed host memory may stay resident")
    return ok
