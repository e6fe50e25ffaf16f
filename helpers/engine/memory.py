"""Freed memory handed back to the operating system, so that a long notebook's resident memory tracks what it holds.

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc, memory freed inside the heap (tensors below
the mmap threshold, which glibc raises to the largest block freed so far, up to 32 MB) stays in the process:
measured on Gemma-3-270M at 64 prompts, plain attribution patching left 1.2 GB resident after returning only small
results, and EAP-IG's gradient chunks reached 5.8 GB where the same work with the memory returned between chunks
peaked at 5.0 GB, at the same speed. ``release_freed_memory`` asks glibc to return every free page
(``malloc_trim(0)``); it takes milliseconds and frees nothing a tensor still uses. Called between the chunks of the
long computations and after every notebook cell (``release_after_each_cell``). Elsewhere (macOS, musl) a no-op.
(Setting ``MALLOC_MMAP_THRESHOLD_`` instead keeps the memory low too, but made EAP-IG 40% slower here.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the operating system; True where the C library could (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _after_cell(result=None) -> None:
    release_freed_memory()


def release_after_each_cell() -> None:
    """In a notebook kernel, release freed memory after every cell (IPython's ``post_run_cell`` event; once)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and _after_cell not in shell.events.callbacks["post_run_cell"]:
        shell.events.register("post_run_cell", _after_cell)
