"""Where a CPU call's thread time goes, from `perf` samples: no profiler in the calls.

`torch.profiler` records every operator, which costs time per operator and inflates
short ones, and sees nothing inside a library call: it cannot tell a GEMM's arithmetic
from its operand packing, nor a thread that waits. Linux `perf` samples the process's
threads at a fixed rate (`cpu-clock`, software timer: no hardware counters needed, so
it works in VMs) while the calls run untouched. Each sample's function and library put
it in one category (`classify`):

- `gemm_kernels`: the BLAS inner kernels (MKL's `*gemm_kernel*`, `*gemv*`), the
  arithmetic the FLOP count describes;
- `gemm_packing`: the rest of the BLAS calls (copying operands into panels, scaling
  the output before accumulating into it);
- `fused_kernels`: `components.fused`'s C kernels; `compiled_kernels`: inductor's;
- `random_draws`: `rlcore.bernoulli`'s kernel and ATen's generators;
- `optimizer_ema`: ATen's Adam, lerp (EMA) and norm kernels;
- `other_aten`: every other ATen kernel and ATen's own bookkeeping;
- `python_dispatch`: the interpreter, torch's Python bindings, ctypes and c10;
- `openmp_wait`: the OpenMP runtime, nearly all of it threads spinning at a barrier
  or waiting for the next parallel region (a thread with nothing to do);
- `system`: libc (malloc, memcpy), the C++ runtime and the kernel (page faults);
- `other`.

Shares are given for the main thread (the one that runs the calls: its time is the
calls' wall time, so its shares split the wall time) and for all threads together.
`sample_calls(fn, repeats)` needs the `perf` binary and permission to attach to this
process (`kernel.perf_event_paranoid` <= 2 for one's own processes, and a container
that allows the system call); `unavailable()` says why not where it cannot run.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the categories, in table order, with their column labels in `runners.bench`
THREAD_LABELS = {"gemm_kernels": "GEMM kernels", "gemm_packing": "GEMM packing",
                 "fused_kernels": "fused", "compiled_kernels": "compiled",
                 "random_draws": "draws", "optimizer_ema": "optimizer, EMA",
                 "other_aten": "other ATen", "python_dispatch": "Python, dispatch",
                 "openmp_wait": "OpenMP wait", "system": "libc, kernel", "other": "other"}
THREAD_KEYS = tuple(THREAD_LABELS)
_LINE = re.compile(r"^\s*(\d+)\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")
_RANDOM_SYMBOLS = ("normal_kernel", "NormalFill", "CPUGeneratorImpl", "mt19937",
                   "uniform_kernel", "randperm", "multinomial", "bernoulli")


def classify(symbol: str, dso: str) -> str:
    """The category of one sample: its function `symbol` and its library path `dso`."""
    lib = os.path.basename(dso)
    if lib.startswith(("libgomp", "libiomp", "libomp")):
        return "openmp_wait"
    if "gemm" in symbol or "gemv" in symbol:
        return "gemm_kernels" if ("kernel" in symbol or "gemv" in symbol) else "gemm_packing"
    if lib.startswith("layer_norm_act"):
        return "fused_kernels"
    if lib.startswith("bernoulli") or any(s in symbol for s in _RANDOM_SYMBOLS):
        return "random_draws"
    if "torchinductor" in dso or (os.environ.get("TORCHINDUCTOR_CACHE_DIR")
                                  and dso.startswith(os.environ["TORCHINDUCTOR_CACHE_DIR"])):
        return "compiled_kernels"
    if "adam" in symbol or "lerp" in symbol or "norm_kernel" in symbol:
        return "optimizer_ema"
    if lib.startswith(("libtorch_cpu", "libtorch.so")):
        return "other_aten"
    if (lib.startswith(("libpython", "libtorch_python", "_ctypes", "libffi", "libc10"))
            or ".cpython-" in lib):
        return "python_dispatch"
    if lib.startswith(("libc.so", "libc-", "ld-linux", "libstdc++", "libpthread", "[kernel")):
        return "system"
    return "other"


def unavailable() -> str | None:
    """Why `sample_calls` cannot run here, or None."""
    if os.name != "posix" or not Path("/proc/self").exists():
        return "perf sampling needs Linux"
    if shutil.which("perf") is None:
        return "the perf tool is not installed (linux-tools / linux-perf)"
    return _probe()


@functools.cache
def _probe() -> str | None:
    """Whether perf can sample a process here at all (containers may forbid the system
    call): one short recording of `true`."""
    with tempfile.TemporaryDirectory(prefix="thread-time-") as tmp:
        try:
            proc = subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-o",
                                   str(Path(tmp) / "probe.data"), "--", "true"],
                                  capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"perf could not run: {e}"
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no message"])[0]
        return f"perf cannot sample here ({detail})"
    return None


def summarize_samples(lines: list[str], main_tid: int) -> dict[str, Any]:
    """Shares per category from `perf script -F tid,ip,sym,dso` lines."""
    main, every, threads = Counter(), Counter(), set()
    for line in lines:
        m = _LINE.match(line)
        if not m:
            continue
        tid, cat = int(m[1]), classify(m[2], m[3])
        threads.add(tid)
        every[cat] += 1
        if tid == main_tid:
            main[cat] += 1
    n_main, n_all = sum(main.values()), sum(every.values())
    return {
        "main_samples": n_main, "all_samples": n_all, "threads": len(threads),
        "main": {k: main[k] / n_main if n_main else 0.0 for k in THREAD_KEYS},
        "all": {k: every[k] / n_all if n_all else 0.0 for k in THREAD_KEYS},
    }


def sample_calls(fn: Callable[[], Any], repeats: int, *, frequency: int = 999,
                 attach_timeout: float = 10.0) -> dict[str, Any]:
    """Run `fn` `repeats` times under `perf record` attached to this process and return
    the shares of thread time per category (`summarize_samples`), with `calls`,
    `seconds` (wall time of the calls) and `frequency_hz`. Raises RuntimeError (with
    perf's message) where perf cannot sample; see `unavailable`."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    main_tid = threading.main_thread().native_id
    with tempfile.TemporaryDirectory(prefix="thread-time-") as tmp:
        data = Path(tmp) / "perf.data"
        proc = subprocess.Popen(
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(frequency),
             "-p", str(os.getpid()), "-o", str(data)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + attach_timeout
            # perf writes the file's header once it is attached
            while not (data.exists() and data.stat().st_size > 0):
                if proc.poll() is not None:
                    raise RuntimeError(f"perf record stopped: {proc.stderr.read().strip()}")
                if time.monotonic() > deadline:
                    raise RuntimeError("perf record did not attach within "
                                       f"{attach_timeout:.0f} s")
                time.sleep(0.05)
            time.sleep(0.2)
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            seconds = time.perf_counter() - t0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        script = subprocess.run(["perf", "script", "-i", str(data), "-F", "tid,ip,sym,dso"],
                                capture_output=True, text=True, timeout=300, check=False)
        if script.returncode != 0:
            raise RuntimeError(f"perf script failed: {script.stderr.strip()}")
    out = summarize_samples(script.stdout.splitlines(), main_tid)
    if out["main_samples"] == 0:
        raise RuntimeError("perf recorded no samples of the calling thread")
    out.update(calls=repeats, seconds=seconds, frequency_hz=frequency)
    return out
