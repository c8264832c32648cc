"""Small C kernels compiled on first use and loaded with ctypes.

Some CPU hot spots are a few lines of C that the compiler vectorizes, where PyTorch has
no fused kernel (see `rlcore.bernoulli` and `components.fused`). `load(name, source)`
compiles `source` with the system C compiler (`$CC`, default `cc`: the one torch.compile
already needs on CPU) into a cache folder and returns the library, or None where that is
not possible, in which case callers run their plain PyTorch path (the same results).

- Cache folder: `$TDMPC2_CACHE_DIR`, else `$XDG_CACHE_HOME/tdmpc2-gin`, else
  `~/.cache/tdmpc2-gin`. A build is keyed by its source, compiler, flags, the OpenMP
  runtime it links and this CPU's model and flags, so a `-march=native` build is only
  reused on a machine it runs on (clusters share home folders across node types).
- `TDMPC2_NATIVE_KERNELS=0` turns every kernel off.
- OpenMP kernels link the OpenMP runtime that torch has already loaded (found in
  `/proc/self/maps`), so they share torch's thread pool and `torch.set_num_threads`;
  where none is found they are not built.
- A failed build warns once (with the compiler's message) and is not retried in the
  process.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import re
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch  # (also loads torch's OpenMP runtime before we look for it)

__all__ = ["load", "enabled"]

_log = logging.getLogger("rlcore")
# -fno-trapping-math (as torch's own build): without it GCC may not if-convert a clamp
# (`x > hi ? hi : x`) on CPUs without AVX-512 masks, and the loop holding it stays
# scalar: on an AVX2-only Zen 3 the fused LayerNorm -> Mish kernel ran 5-7x slower. It
# changes no computed value (it allows speculation, not reassociation).
_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-std=c99", "-fPIC"]
_LOADED: dict[str, ctypes.CDLL | None] = {}
_BY_SOURCE: dict[tuple[str, str, bool, tuple[str, ...]], ctypes.CDLL | None] = {}


def profiled(name: str):
    """`torch.profiler.record_function(name)` while a profiler runs, else a no-op (the
    range costs about 6 us per call even with no profiler)."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def enabled() -> bool:
    """False when `TDMPC2_NATIVE_KERNELS=0`."""
    return os.environ.get("TDMPC2_NATIVE_KERNELS", "1") != "0"


def cache_dir() -> Path:
    if os.environ.get("TDMPC2_CACHE_DIR"):
        return Path(os.environ["TDMPC2_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tdmpc2-gin"


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return platform.machine() + "\n" + "\n".join(sorted(set(keep)))


def _openmp_runtime() -> str | None:
    """Path of the OpenMP runtime this process has loaded (torch's), if any."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in maps:
        path = line.split()[-1] if line.split() else ""
        if re.search(r"/lib(gomp|iomp5|omp)[^/]*\.so", path):
            return path
    return None


def load(name: str, source: str, *, openmp: bool = False,
         flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled `source` as a ctypes library, or None (then use the PyTorch path).
    `flags`: compiler flags of this library, after the common ones."""
    if not enabled():
        return None
    fast_key = (name, source, openmp, flags)
    if fast_key in _BY_SOURCE:  # the hot path: one dict lookup per call
        return _BY_SOURCE[fast_key]
    cc = os.environ.get("CC", "cc")
    omp = _openmp_runtime() if openmp else None
    key_parts = [source, cc, *_FLAGS, *flags, str(openmp), omp or "", _cpu_signature(),
                 str(cache_dir())]
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:20]
    if key in _LOADED:
        _BY_SOURCE[fast_key] = _LOADED[key]
        return _LOADED[key]
    lib = None
    try:
        if openmp and omp is None:
            raise OSError("no OpenMP runtime is loaded in this process")
        path = cache_dir() / f"{name}_{key}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src, obj, out = (Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.o",
                                 Path(tmp) / path.name)
                src.write_text(source)
                compile_flags = [*_FLAGS, *flags] + (["-fopenmp"] if openmp else [])
                run = dict(check=True, capture_output=True, text=True, timeout=180)
                subprocess.run([cc, *compile_flags, "-c", str(src), "-o", str(obj)], **run)
                # link torch's OpenMP runtime itself, not the compiler's, so both share one
                subprocess.run([cc, "-shared", str(obj), *([omp] if omp else []), "-o", str(out)],
                               **run)
                os.replace(out, path)  # atomic: concurrent builders each write a whole file
        lib = ctypes.CDLL(str(path))
        _log.debug("native kernel %s: %s", name, path)
    except (OSError, subprocess.SubprocessError) as err:
        detail = (getattr(err, "stderr", None) or str(err)).strip()
        warnings.warn(f"rlcore.native: could not build the {name} kernel ({detail}); using "
                      "the plain PyTorch path instead (same results, slower)",
                      RuntimeWarning, stacklevel=3)
    _LOADED[key] = _BY_SOURCE[fast_key] = lib
    return lib


def clear() -> None:
    """Forget loaded and failed builds (after changing the environment; tests)."""
    _LOADED.clear()
    _BY_SOURCE.clear()
