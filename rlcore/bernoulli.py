"""PyTorch's CPU Bernoulli draw, bit for bit, vectorized; and dropout built on it.

`Tensor.bernoulli_(p)` on CPU draws serially: each value takes two words of the default
generator's mt19937 stream (high word first), keeps their low 53 bits as `v` and returns
`v * 2**-53 < p`. That loop takes 4-7 ns per value on the 2-core machine in the README,
about 14 ms of every dog-run update (the Q ensemble's dropout mask). `bernoulli_` here
computes the same values from the same generator state, and leaves the generator where
PyTorch's draw would have left it, with a small C kernel that the compiler vectorizes
(the mt19937 twist and tempering over whole blocks, the comparison as `v < ceil(p 2**53)`
on integers): about 8x faster. Every later draw (`randn`, `rand`, another mask) sees the
same stream as before, so a seed gives the same results.

The kernel is compiled on first use by `rlcore.native` (system C compiler, cached).
Without a compiler, or with `TDMPC2_NATIVE_KERNELS=0`, every call is PyTorch's own draw:
the same values, slower.

PyTorch's draw holds the generator's lock; this one reads the default generator's state,
runs the kernel and writes the state back, so it must not race with draws from another
Python thread (nothing in this framework draws from two threads at once).

`dropout(x, p)` is `F.dropout` (training) with the mask drawn here; on CPU in eager mode
its output and gradients equal `F.dropout`'s bit for bit. Under torch.compile the draw is
the custom op `tdmpc2::bernoulli_` (opaque to the compiler, never merged or recomputed,
and kept in program order with the other draws by `rlcore.draws`' token), and the
scaling is left to inductor to fuse. On CUDA the mask is `Tensor.bernoulli_`'s, from
the CUDA generator, drawn the same way in eager and compiled code; other dtypes and
strided tensors take F.dropout unchanged.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import torch
import torch.nn.functional as F

from rlcore import draws, native

__all__ = ["apply_dropout_mask", "bernoulli_", "dropout", "dropout_mask",
           "fast_bernoulli_available"]

_SOURCE = r"""
#include <stdint.h>
#define MT_N 624
#define MT_M 397
#define UPPER 0x80000000u
#define LOWER 0x7fffffffu
#define MATRIX_A 0x9908b0dfu
#define CHUNK 16

/* One mt19937 state update over the whole block (ATen's next_state). Both loops
   vectorize: the first reads only old words, the second reads words written 227
   iterations earlier. */
static void mt_twist(uint32_t *restrict s) {
    int i;
    for (i = 0; i < MT_N - MT_M; i++) {
        uint32_t y = (s[i] & UPPER) | (s[i + 1] & LOWER);
        s[i] = s[i + MT_M] ^ (y >> 1) ^ ((0u - (s[i + 1] & 1u)) & MATRIX_A);
    }
    for (; i < MT_N - 1; i++) {
        uint32_t y = (s[i] & UPPER) | (s[i + 1] & LOWER);
        s[i] = s[i + MT_M - MT_N] ^ (y >> 1) ^ ((0u - (s[i + 1] & 1u)) & MATRIX_A);
    }
    uint32_t y = (s[MT_N - 1] & UPPER) | (s[0] & LOWER);
    s[MT_N - 1] = s[MT_M - 1] ^ (y >> 1) ^ ((0u - (s[0] & 1u)) & MATRIX_A);
}

static void mt_temper(const uint32_t *restrict s, uint32_t *restrict out, int n) {
    for (int i = 0; i < n; i++) {
        uint32_t y = s[i];
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c5680u;
        y ^= (y << 15) & 0xefc60000u;
        y ^= y >> 18;
        out[i] = y;
    }
}

/* A value is v = (w0 << 32 | w1) & (2**53 - 1), kept when v < thr. On 32-bit halves
   (thr <= 2**53, so th = thr >> 32 <= 2**21): v < thr <=> hi < th or (hi == th and
   w1 < tl), with hi = w0 & (2**21 - 1). The compiler packs eight of these per AVX2
   vector; the 64-bit form took twice as long. */
static void pairs_f32(const uint32_t *restrict w, float *restrict out, int64_t n, uint64_t thr) {
    const uint32_t th = (uint32_t)(thr >> 32), tl = (uint32_t)thr;
    for (int64_t k = 0; k < n; k++) {
        uint32_t hi = w[2 * k] & 0x1fffffu, lo = w[2 * k + 1];
        out[k] = ((hi < th) | ((hi == th) & (lo < tl))) ? 1.0f : 0.0f;
    }
}

static void pairs_u8(const uint32_t *restrict w, uint8_t *restrict out, int64_t n, uint64_t thr) {
    const uint32_t th = (uint32_t)(thr >> 32), tl = (uint32_t)thr;
    for (int64_t k = 0; k < n; k++) {
        uint32_t hi = w[2 * k] & 0x1fffffu, lo = w[2 * k + 1];
        out[k] = (uint8_t)((hi < th) | ((hi == th) & (lo < tl)));
    }
}

/* n values into out (kind 0: float32, 1: one byte each), advancing the engine's state,
   left_ and next_ exactly as n calls of two engine steps each would. The engine steps
   `if (--left == 0) twist, left = 624, next = 0; return temper(state[next++])`, so
   left - 1 words remain in the current block from index next. */
int tdmpc2_bernoulli(uint32_t *state, int32_t *left, uint64_t *next, void *out, int64_t n,
                     uint64_t thr, int kind) {
    uint32_t buf[MT_N * CHUNK + 2];
    int64_t done = 0;
    int have = 0;  /* words in buf not yet used (0 or 1 carried over) */
    int32_t l = *left;
    uint64_t nx = *next;
    if (l < 1 || l > MT_N || nx > MT_N) return 1;
    while (done < n) {
        int64_t need = 2 * (n - done) - have;
        int64_t cap = MT_N * CHUNK - have;
        if (need > cap) need = cap;
        int64_t got = 0;
        while (got < need) {
            int64_t avail = l - 1;
            if (avail == 0) {
                mt_twist(state);
                l = MT_N + 1;  /* taking k words of a fresh block leaves left = 625 - k */
                nx = 0;
                avail = MT_N;
            }
            int64_t take = avail < need - got ? avail : need - got;
            mt_temper(state + nx, buf + have + got, (int)take);
            got += take;
            nx += (uint64_t)take;
            l -= (int32_t)take;
        }
        have += (int)got;
        int64_t pairs = have / 2;
        if (kind == 0) pairs_f32(buf, (float *)out + done, pairs, thr);
        else pairs_u8(buf, (uint8_t *)out + done, pairs, thr);
        done += pairs;
        if (have & 1) { buf[0] = buf[have - 1]; have = 1; } else have = 0;
    }
    *left = l;
    *next = nx;
    return 0;
}
"""

_KINDS = {torch.float32: 0, torch.bool: 1, torch.uint8: 1}
# CPUGeneratorImpl's serialized state (torch.get_rng_state()): seed u64, left i32,
# seeded i32, next u64, then the 624 state words, each stored as a u64.
_LEFT, _NEXT, _STATE, _N = 8, 16, 24, 624


def _library():
    """The compiled kernel's function, or None (then PyTorch draws)."""
    lib = native.load("bernoulli", _SOURCE)
    if lib is None:
        return None
    fn = lib.tdmpc2_bernoulli
    if fn.argtypes is None:
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_uint64, ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


def fast_bernoulli_available() -> bool:
    """Whether `bernoulli_` uses the compiled kernel here (else PyTorch's draw)."""
    return _library() is not None


def _fast_ok(out: torch.Tensor, p: float) -> bool:
    return (out.device.type == "cpu" and out.dtype in _KINDS and out.is_contiguous()
            and 0.0 <= p <= 1.0 and out.numel() > 0 and _library() is not None)


def _draw(out: torch.Tensor, p: float) -> None:
    state = torch.get_rng_state()
    raw = state.numpy()
    left = raw[_LEFT:_LEFT + 4].view(np.int32).copy()
    nxt = raw[_NEXT:_NEXT + 8].view(np.uint64).copy()
    words = raw[_STATE:_STATE + 8 * _N].view(np.uint64).astype(np.uint32)
    thr = math.ceil(p * 2.0 ** 53)  # v * 2**-53 < p  <=>  v < ceil(p * 2**53), exactly
    if _library()(words.ctypes.data, left.ctypes.data, nxt.ctypes.data, out.data_ptr(),
                  out.numel(), thr, _KINDS[out.dtype]) != 0:
        raise RuntimeError("rlcore.bernoulli: the CPU generator's state is not a valid mt19937 state")
    raw[_LEFT:_LEFT + 4] = left.view(np.uint8)
    raw[_NEXT:_NEXT + 8] = nxt.view(np.uint8)
    raw[_STATE:_STATE + 8 * _N] = words.astype(np.uint64).view(np.uint8)
    torch.set_rng_state(state)


@torch.library.custom_op("tdmpc2::bernoulli_", mutates_args=("out", "token"),
                         tags=(torch.Tag.nondeterministic_seeded,))
def _bernoulli_op(out: torch.Tensor, p: float, token: torch.Tensor) -> None:
    """`out.bernoulli_(p)` from the default generator, as an op that compiled graphs call."""
    if _fast_ok(out, p):
        _draw(out, p)
    else:
        out.bernoulli_(p)


def bernoulli_(out: torch.Tensor, p: float) -> torch.Tensor:
    """`out.bernoulli_(p)` with the default generator: the same values and the same
    generator state afterwards, drawn by the vectorized kernel where it applies."""
    if torch.compiler.is_compiling():
        torch.ops.tdmpc2.bernoulli_(out, p, draws.token(out.device))
    elif _fast_ok(out, p):
        with native.profiled("tdmpc2::bernoulli_"):  # named as when compiled
            _draw(out, p)
    else:
        out.bernoulli_(p)
    return out


def dropout_mask(x: torch.Tensor, p: float, dtype: torch.dtype | None = None
                 ) -> torch.Tensor | None:
    """Training dropout's mask for x: 0s and 1s (kept with probability 1 - p) drawn by
    `bernoulli_`, the draw `dropout` makes; None where `dropout` takes F.dropout instead
    (other dtypes and devices, strided x, p not in (0, 1)). `dropout(x, p)` is then
    `x * (mask / (1 - p))`, which a kernel may compute itself (`components.fused`).

    `dtype`: the mask's (default x's). A uint8 or bool mask holds the same values from
    the same draws (one per element, whatever the dtype) in a quarter of the memory: what
    the fused kernels read."""
    if not (0.0 < p < 1.0 and x.device.type in ("cpu", "cuda")
            and x.dtype == torch.float32 and x.is_contiguous()):
        return None
    return bernoulli_(torch.empty_like(x, dtype=dtype), 1.0 - p)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with the mask drawn by `bernoulli_` on CPU and CUDA.

    On CPU the values are F.dropout's. On CUDA the mask comes from `bernoulli_` rather than
    F.dropout's fused kernel (other numbers from the same seed), so that compiled graphs,
    which draw it through `tdmpc2::bernoulli_` in program order, match eager runs.
    """
    noise = dropout_mask(x, p) if training else None
    if noise is None:
        return F.dropout(x, p, training=training)
    return apply_dropout_mask(x, noise, 1.0 - p)


def apply_dropout_mask(x: torch.Tensor, mask: torch.Tensor, keep: float) -> torch.Tensor:
    """x * (mask / keep): dropout with a drawn mask (`dropout_mask`); in eager code the
    mask is scaled in place."""
    if torch.compiler.is_compiling():
        return x * (mask / keep)  # out of place: inductor fuses it with what follows
    return x * mask.div_(keep)  # what F.dropout computes on CPU (bernoulli_, div_, mul)
