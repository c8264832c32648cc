"""Keep large CPU buffers in the process heap instead of fresh memory maps (glibc).

PyTorch's CPU allocator takes every tensor from `malloc` and gives it back on free.
glibc serves a request above its mmap threshold (128 KiB at start, raised by frees up to
32 MiB) with a fresh `mmap`, and returns a free heap top above the trim threshold to the
kernel: a tensor of a few MiB then costs page faults and zeroing on each first touch,
and an unmap when freed. Planning at E = 8 envs on dog-run allocates and frees tensors of
[4096, 512] (8 MiB) by the hundred per call. With both thresholds raised the freed
buffers stay in the heap and the next tensor of that size reuses them: on the 2-core CPU
of the README's benchmarks, eager E=8 planning went from 2579.8 to 2471.6 ms and the
update from 275.8 and 279.4 to 271.2 and 272.6 ms (medians; the same effect as setting
`GLIBC_TUNABLES`). The process keeps what it has freed instead of returning it, so its
resident memory stays near its peak, which the peak already was.

`keep_large_buffers()` is called by the runners' entry points; `TDMPC2_MALLOC_TUNING=0`
turns it off. Elsewhere (not Linux, not glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_large_buffers"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_large_buffers(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Serve allocations below `mmap_threshold` bytes from the heap and keep up to
    `trim_threshold` bytes of freed heap top; True where glibc took both settings."""
    if not 0 < mmap_threshold < 2**31 or not 0 < trim_threshold < 2**31:
        raise ValueError("thresholds must be positive and below 2 GiB (mallopt takes an int), "
                         f"got {mmap_threshold} and {trim_threshold}")
    if os.environ.get("TDMPC2_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
                and mallopt(_M_TRIM_THRESHOLD, trim_threshold))
