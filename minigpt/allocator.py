"""Keep the memory a training or scoring loop frees inside the process, for the next step to reuse.

glibc's malloc serves large blocks (above a threshold of at most 32 MiB) with fresh mappings and returns
them to the kernel when they are freed, and hands the top of its heap back above another threshold. A
training step allocates the same large tensors every time (the head's log-probabilities, an embedding
table's dense gradient) and frees them at its end: with those defaults the next step gets fresh pages,
and the kernel zero-fills each 4 KiB page on its first write, a page fault each, which on a small model
on a CPU costs as much as a sizeable part of the arithmetic. Told never to map blocks of their own and
never to trim, glibc reuses the freed memory instead: the process's peak memory is the same, it is just
not handed back until the process ends. C libraries other than glibc (macOS, musl) are left as they are.
"""

from __future__ import annotations

import ctypes
import sys

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt's value is a C int


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (no mapped blocks, no trimming) from now on in this
    process. Returns whether it applied: False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl has a mallopt that does nothing)
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
