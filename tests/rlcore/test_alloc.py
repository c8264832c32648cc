"""rlcore.alloc: large buffers come from the heap and stay there once freed (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest

from rlcore import alloc


def _has_mallinfo2() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallinfo2")
    except OSError:
        return False


needs_glibc = pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")

# A fresh interpreter allocates 16 MiB and prints how many more bytes glibc holds in
# memory maps while it lives, then frees it and prints whether the heap kept it as free
# space for the next allocation.
_PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, sys
    from rlcore import alloc

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallinfo2.restype = Info
    print(alloc.keep_large_buffers() if sys.argv[1] == "1" else "skipped")
    before = libc.mallinfo2().hblkhd
    buf = bytearray(16 << 20)
    print(libc.mallinfo2().hblkhd - before)
    del buf
    print(libc.mallinfo2().fordblks >= 16 << 20)
""")


def _probe(tune: bool, **env) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, "1" if tune else "0"], check=True,
                         capture_output=True, text=True, env={**os.environ, **env},
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    return out.stdout.split()


@needs_glibc
def test_large_buffers_come_from_the_heap_and_stay_there():
    default = _probe(tune=False)
    assert int(default[1]) >= 16 << 20  # glibc's default: a fresh memory map
    tuned = _probe(tune=True)
    assert tuned[0] == "True"
    assert int(tuned[1]) == 0  # from the heap
    assert tuned[2] == "True"  # and kept there once freed, for the next tensor


@needs_glibc
def test_the_environment_switch_turns_it_off():
    off = _probe(tune=True, TDMPC2_MALLOC_TUNING="0")
    assert off[0] == "False" and int(off[1]) >= 16 << 20


def test_thresholds_mallopt_cannot_take_are_refused():
    with pytest.raises(ValueError, match="below 2 GiB"):
        alloc.keep_large_buffers(mmap_threshold=4 << 30)
    with pytest.raises(ValueError, match="positive"):
        alloc.keep_large_buffers(trim_threshold=0)
