"""Quantities as Kubernetes writes them become byte counts; anything else is a clear error."""
from __future__ import annotations

import pytest

from cpt_api.quantity import format_bytes, parse_quantity


@pytest.mark.parametrize("text,expected", [
    ("80Gi", 80 << 30), ("40G", 40 * 10**9), ("81920Mi", 80 << 30), ("1.5Gi", 3 << 29),
    ("512", 512), ("1e9", 10**9), ("2Ti", 2 << 40),
], ids=lambda v: str(v))
def test_quantities_parse_to_bytes(text: str, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["80 gigs", "", "Gi", "-1Gi", "80GB"])
def test_a_non_quantity_names_examples(text: str) -> None:
    with pytest.raises(ValueError, match="80Gi"):
        parse_quantity(text)


def test_bytes_print_in_binary_units() -> None:
    assert format_bytes(80 << 30) == "80.0 GiB"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(12) == "12 B"
