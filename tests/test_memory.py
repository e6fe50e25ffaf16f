"""Freed memory handed back to the system (helpers.engine.memory)."""

from __future__ import annotations

import platform

import psutil

from helpers.engine import memory


def test_release_returns_freed_heap_memory():
    """Many small freed blocks stay resident under glibc until released; after the release the process is smaller."""
    if platform.libc_ver()[0] != "glibc":
        assert memory.release_freed_memory() is False
        return
    blocks = [bytearray(64 * 1024) for _ in range(4000)]  # 256 MB in heap-sized blocks
    del blocks[:-1]  # freed, except the last (pins the heap's top)
    before = psutil.Process().memory_info().rss
    assert memory.release_freed_memory() is True
    assert psutil.Process().memory_info().rss < before - 100 * 2**20


def test_release_after_each_cell_registers_once():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    memory.release_after_each_cell()
    memory.release_after_each_cell()
    assert shell.events.callbacks["post_run_cell"].count(memory._after_cell) == 1
