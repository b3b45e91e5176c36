"""The trainer fixes glibc's mmap threshold unless the environment already sets it."""
from __future__ import annotations

import platform

import pytest

from cpt_trainer.hostmem import fix_mmap_threshold


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_threshold_is_fixed_under_glibc() -> None:
    assert fix_mmap_threshold() is True


def test_an_explicit_environment_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold() is False
