"""Kubernetes resource quantities (`80Gi`, `500M`, `1.5e9`) as byte counts, without a client.

The spec stores quantities as strings, as Kubernetes does; the planner needs numbers.
"""
from __future__ import annotations

import re

QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|[eE][0-9]+)?$"
_SUFFIX = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60,
           "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "": 1}


def parse_quantity(text: str) -> int:
    """Bytes in a quantity such as `80Gi`; ValueError names what is wrong."""
    match = re.match(QUANTITY_PATTERN, text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a quantity (examples: 80Gi, 40G, 81920Mi)")
    number, suffix = float(match.group(1)), match.group(3) or ""
    if suffix[:1] in ("e", "E"):
        return int(number * 10 ** int(suffix[1:]))
    return int(number * _SUFFIX[suffix])


def format_bytes(n: float) -> str:
    """Binary units with one decimal, as people read memory (`12.3 GiB`)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
