"""trainer/distributed.py's single-process parts: the test-only fault spec and the
allocator setting."""

from __future__ import annotations

import platform

import pytest

from shardmf.errors import InputError
from trainer.distributed import TestFault


@pytest.mark.parametrize("text", ["kill:1", "boom:1:3", "kill:x:3", "raise:0:0"])
def test_test_fault_spec_is_checked(text: str) -> None:
    with pytest.raises(InputError, match="SHARDMF_TEST_FAULT"):
        TestFault.parse(text)
    assert TestFault.parse("kill:1:40") == TestFault("kill", 1, 40)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_sets_glibc_thresholds() -> None:
    """The allocator setting must take where glibc runs (it is worth 30-45 % of a step)."""
    from trainer.distributed import keep_freed_memory

    assert keep_freed_memory() is True
