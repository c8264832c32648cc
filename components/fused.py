"""LayerNorm -> affine -> Mish (or SimNorm) as one CPU kernel, forward and backward.

Every hidden layer of the world model ends in `mish(layer_norm(h) * w + b)`. In eager
PyTorch that is five passes over the activations (LayerNorm, the affine, and Mish's
three), and the backward pass stores and re-reads each intermediate; inductor fuses the
forward, but its backward still writes and re-reads two full intermediates and splits an
ensemble's 5 members unevenly over threads. `layer_norm_mish` does each row while it
sits in L1: forward (mean, variance, normalise, affine, Mish), and backward (recompute
the normalised row and Mish's derivative, the row sums LayerNorm's gradient needs, and
per-thread sums for the affine's weight and bias gradients). Within a row the
exponentials run in a loop of their own, apart from the loops that use them (the
forward over 256-wide chunks of the row, the backward over the whole row into the
gradient buffer): on the AVX2 machine in the README that made the forward 13% and the
backward 22% faster than one loop doing everything (a C harness; outputs bit-identical).
Rows are split evenly over torch's OpenMP threads. `layer_norm_simnorm` does the same
with SimNorm (a softmax over each group of 8 units) for the encoder's and dynamics' last
layers. Both take the preceding Linear's bias as an optional input (`bias=`), added to
each row as it is read, so the layers run that Linear as a plain matmul
(`components.layers.folds_bias`): an addmm first writes the broadcast bias into its
output, one more pass, and its backward sums the output gradient's rows in another,
which the backward kernel does as it goes. The Q ensemble's first layer also takes
dropout's mask (`dropout_mask=`, drawn by the caller from the same generator as
`rlcore.bernoulli.dropout`): the kernel applies it to each row after the bias and
multiplies the input gradient by it as it writes it, so neither the dropped-out
activations nor their gradient takes a pass of its own (and that layer's bias folds
too). The compiled dog-run update went from 262.1, 270.1, 266.2 and 261.8 ms to 247.1,
255.9, 248.1 and 267.0 ms (alternating processes, each call scaled to a 180 GFLOP/s
matmul).

The exponential is a degree-7 polynomial after range reduction (about 1 ulp), so the
loops vectorize without -ffast-math. On AVX CPUs it runs as 8-lane vector code written
out (`exp8`: the same operations, so the same bits, in fewer instructions than gcc's
code for the scalar form), and SimNorm's groups of 8 are transposed so that 8 groups'
max, sum and scaling are each one vector operation: Mish forward 16% and SimNorm forward
21% faster on one thread. Mish uses the same one-exponential form as
`components.layers.mish` (clamped at 20, where it is exact in float32). Results agree with
`F.mish(F.layer_norm(h) * w + b)` to float32 rounding (tests compare both against a
float64 reference).

Used on CPU for float32 activations, in eager mode (planning, eager updates) and in
CPU graphs compiled by torch.compile. Elsewhere (CUDA, other dtypes, `reference_kernels()`,
or where the kernel cannot be built: see `rlcore.native`) the plain PyTorch ops run.
Compiled graphs call the kernels as the custom ops `tdmpc2::layer_norm_act_v2` and its
backward (the version: see `OP_SCHEMAS`), with the Linear's bias passed in as in eager code. For SimNorm, inductor's own
kernel for a softmax over groups of 8 took 6.1 ms for [4288, 512] against the kernel's
1.0 ms. For Mish, the op alone measured no faster than inductor's fusion (the Linear
before it stayed an `addmm`, whose output starts as a copy of the broadcast bias); with
the bias folded into the op as well, compiled dog-run planning at E=8 went from 2561,
2504 and 2566 ms to 2398, 2417 and 2462 ms (three alternating runs, medians of 6 calls),
the update from 266.7 to 261.7 ms, E=1 planning from 332.7 to 330.1 ms.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from typing import Iterator

import torch

from rlcore import native

__all__ = ["layer_norm_mish", "layer_norm_simnorm", "fused_available", "kernel_time"]

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <omp.h>

/* exp(x) for x in [-87, 20] (callers clamp): 2^n p(r) with n = round(x / ln2) (by the
   1.5 * 2^23 trick, which vectorizes where floorf does not), r = x - n ln2 in two parts,
   p Cephes' degree-7 expf polynomial, evaluated by Estrin's scheme (a shorter chain of
   dependent operations than Horner's: the loops are latency-bound). */
static inline float exp_clamped(float x) {
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float r2 = r * r;
    float p01 = 5.0000001201e-1f + 1.6666665459e-1f * r;
    float p23 = 4.1665795894e-2f + 8.3334519073e-3f * r;
    float p45 = 1.3981999507e-3f + 1.9875691500e-4f * r;
    float p = (r + 1.0f) + r2 * (p01 + r2 * (p23 + r2 * p45));
    union { int32_t i; float f; } s = { .i = ((int32_t)n + 127) << 23 };
    return p * s.f;
}

static inline float clamp_exp_arg(float z) {
    return z > 20.0f ? 20.0f : (z < -87.0f ? -87.0f : z);
}

typedef float v8 __attribute__((vector_size(32)));
static inline v8 ld8(const float *p) { v8 v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void st8(float *p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }

/* exp_clamped(clamp_exp_arg(x)) on 8 lanes, with the same operations on the same values
   (the same results: checked on every 7th float32 bit pattern, NaN and infinities
   included), in fewer instructions: the clamp as min/max (the constant first, so a NaN
   passes through), and 2^n built from the rounding sum's own bits (its low bits hold n)
   instead of a float-to-int conversion. gcc's code for the scalar form compared and
   blended twice for the clamp. Mish forward [512, 512]: 224 -> 188 us on one thread,
   122 -> 95 us on two; Mish backward [2560, 512]: 2409 -> 1904 us on one thread, 1205 ->
   916 us on two (a C harness; bit-identical outputs). Without AVX (or with
   -DTDMPC2_SCALAR, which the tests build to compare) the scalar loops run. */
#if defined(__AVX__) && !defined(TDMPC2_SCALAR)
#include <immintrin.h>
#define HAVE_EXP8 1
typedef int32_t vi8 __attribute__((vector_size(32)));
static inline v8 exp8(v8 x) {
    const v8 hi = {20.f, 20.f, 20.f, 20.f, 20.f, 20.f, 20.f, 20.f};
    const v8 lo = {-87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f};
    x = __builtin_ia32_maxps256(lo, __builtin_ia32_minps256(hi, x));
    v8 t = x * 1.44269504088896341f + 12582912.0f;
    v8 n = t - 12582912.0f;
    v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8 r2 = r * r;
    v8 p01 = 5.0000001201e-1f + 1.6666665459e-1f * r;
    v8 p23 = 4.1665795894e-2f + 8.3334519073e-3f * r;
    v8 p45 = 1.3981999507e-3f + 1.9875691500e-4f * r;
    v8 p = (r + 1.0f) + r2 * (p01 + r2 * (p23 + r2 * p45));
    vi8 ti, si;
    __builtin_memcpy(&ti, &t, sizeof t);
    si = (ti + 127) << 23;  /* t's bits are 1.5 * 2^23's plus n; those shift out */
    v8 s;
    __builtin_memcpy(&s, &si, sizeof si);
    return p * s;
}

#endif

/* eb[i] = exp_clamped(clamp_exp_arg(z[i])) for i < n */
static inline void exp_row(const float *restrict z, float *restrict eb, int64_t n) {
    int64_t i = 0;
#ifdef HAVE_EXP8
    for (; i + 8 <= n; i += 8) st8(eb + i, exp8(ld8(z + i)));
#endif
    for (; i < n; i++) eb[i] = exp_clamped(clamp_exp_arg(z[i]));
}

static inline void simnorm_groups_scalar(float *restrict z, int64_t D) {
    float eb[256];
    for (int64_t c = 0; c < D; c += 256) {
        int64_t n = D - c < 256 ? D - c : 256;
        float *zc = z + c;
        for (int64_t g = 0; g < n / 8; g++) {
            float *zg = zc + g * 8;
            float m = zg[0];
            for (int j = 1; j < 8; j++) m = zg[j] > m ? zg[j] : m;
            for (int j = 0; j < 8; j++) {
                float d = zg[j] - m;
                zg[j] = d < -87.0f ? -87.0f : d;
            }
        }
        exp_row(zc, eb, n);
        for (int64_t g = 0; g < n / 8; g++) {
            const float *eg = eb + g * 8;
            float s = 0.f;
            for (int j = 0; j < 8; j++) s += eg[j];
            float inv = 1.0f / s;
            for (int j = 0; j < 8; j++) zc[g * 8 + j] = eg[j] * inv;
        }
    }
}

/* SimNorm's softmax backward for whole groups of 8: gz = y (g - <g, y>) per group */
static inline void simnorm_grad_scalar(const float *restrict y, const float *restrict g,
                                       float *restrict gz, int64_t D) {
    for (int64_t q = 0; q < D / 8; q++) {
        const float *yq = y + q * 8, *gq = g + q * 8;
        float dot = 0.f;
        for (int j = 0; j < 8; j++) dot += gq[j] * yq[j];
        for (int j = 0; j < 8; j++) gz[q * 8 + j] = yq[j] * (gq[j] - dot);
    }
}

#ifdef HAVE_EXP8
/* 8 x 8 transpose of c[0..7] (rows of 8 floats) in registers */
static inline void transpose8(v8 c[8]) {
    __m256 t0 = _mm256_unpacklo_ps(c[0], c[1]), t1 = _mm256_unpackhi_ps(c[0], c[1]);
    __m256 t2 = _mm256_unpacklo_ps(c[2], c[3]), t3 = _mm256_unpackhi_ps(c[2], c[3]);
    __m256 t4 = _mm256_unpacklo_ps(c[4], c[5]), t5 = _mm256_unpackhi_ps(c[4], c[5]);
    __m256 t6 = _mm256_unpacklo_ps(c[6], c[7]), t7 = _mm256_unpackhi_ps(c[6], c[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    c[0] = _mm256_permute2f128_ps(u0, u4, 0x20); c[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    c[2] = _mm256_permute2f128_ps(u2, u6, 0x20); c[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    c[4] = _mm256_permute2f128_ps(u0, u4, 0x31); c[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    c[6] = _mm256_permute2f128_ps(u2, u6, 0x31); c[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* SimNorm of 8 groups (64 floats at z) with the groups across the lanes: transposed, so
   that each group's max, sum and scaling are plain vector operations over 8 groups at
   once, in the scalar code's order (the same values); c holds the result, transposed */
static inline void simnorm_block(const float *z, v8 c[8]) {
    for (int j = 0; j < 8; j++) c[j] = ld8(z + 8 * j);
    transpose8(c);
    v8 m = c[0];
    for (int j = 1; j < 8; j++) m = _mm256_max_ps(c[j], m);  /* c > m ? c : m */
    const v8 lo = {-87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f};
    v8 s = {0};
    for (int j = 0; j < 8; j++) {
        c[j] = exp8(_mm256_max_ps(lo, c[j] - m));  /* d < -87 ? -87 : d */
        s += c[j];
    }
    v8 inv = 1.0f / s;
    for (int j = 0; j < 8; j++) c[j] *= inv;
}
#endif

/* LayerNorm -> affine -> SimNorm's softmax over each group of 8 consecutive units, in
   place. With AVX, 8 groups at a time, transposed (see simnorm_block): the forward on
   [512, 512] went from 297 to 235 us on one thread and from 149 to 122 us on two, the
   backward on [2560, 512] from 3502 to 2819 us on one (a C harness; bit-identical
   outputs). Otherwise over chunks of the row in three loops: each group's max
   subtracted, the exponentials (a flat loop), each group's sum and scaling. */
static inline void simnorm_groups(float *restrict z, int64_t D) {
    int64_t c0 = 0;
#ifdef HAVE_EXP8
    for (; c0 + 64 <= D; c0 += 64) {
        v8 c[8];
        simnorm_block(z + c0, c);
        transpose8(c);
        for (int j = 0; j < 8; j++) st8(z + c0 + 8 * j, c[j]);
    }
#endif
    simnorm_groups_scalar(z + c0, D - c0);
}

/* SimNorm's backward for one row: dL/dz from dL/dy, with z overwritten by y = act(z). */
static inline void simnorm_grad_row(float *restrict z, const float *restrict g,
                                    float *restrict gz, int64_t D) {
    int64_t c0 = 0;
#ifdef HAVE_EXP8
    for (; c0 + 64 <= D; c0 += 64) {  /* y recomputed, transposed; so is g */
        v8 y[8], gt[8];
        simnorm_block(z + c0, y);
        for (int j = 0; j < 8; j++) gt[j] = ld8(g + c0 + 8 * j);
        transpose8(gt);
        v8 dot = {0};
        for (int j = 0; j < 8; j++) dot += gt[j] * y[j];
        for (int j = 0; j < 8; j++) gt[j] = y[j] * (gt[j] - dot);
        transpose8(gt);
        for (int j = 0; j < 8; j++) st8(gz + c0 + 8 * j, gt[j]);
    }
#endif
    simnorm_groups_scalar(z + c0, D - c0);  /* the forward's output, recomputed */
    simnorm_grad_scalar(z + c0, g + c0, gz + c0, D - c0);
}

/* A row's mean and 1/std (two passes), each sum kept in four vector partial sums: one
   running sum is a chain of D/8 dependent adds, and rows are short (128-512). With lb
   (the Linear's bias), the first pass also writes y = x + lb: 5% of the forward kernel
   against a pass of its own (a C harness). */
static inline float hsum8(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
static inline void row_stats(const float *x, const float *restrict lb, float *y, int64_t D,
                             float eps, float *mu, float *rs) {
    /* with lb: y = x + lb, written in the same pass as the sum (the same adds in the same
       order as summing y afterwards); the variance pass then reads y */
    v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int64_t i = 0;
    float s;
    if (lb) {
        for (; i + 32 <= D; i += 32) {
            v8 c0 = ld8(x + i) + ld8(lb + i), c1 = ld8(x + i + 8) + ld8(lb + i + 8);
            v8 c2 = ld8(x + i + 16) + ld8(lb + i + 16);
            v8 c3 = ld8(x + i + 24) + ld8(lb + i + 24);
            st8(y + i, c0); st8(y + i + 8, c1); st8(y + i + 16, c2); st8(y + i + 24, c3);
            a0 += c0; a1 += c1; a2 += c2; a3 += c3;
        }
        for (; i + 8 <= D; i += 8) { v8 c = ld8(x + i) + ld8(lb + i); st8(y + i, c); a0 += c; }
        s = hsum8((a0 + a1) + (a2 + a3));
        for (; i < D; i++) { y[i] = x[i] + lb[i]; s += y[i]; }
        x = y;
    } else {
        for (; i + 32 <= D; i += 32) {
            a0 += ld8(x + i); a1 += ld8(x + i + 8);
            a2 += ld8(x + i + 16); a3 += ld8(x + i + 24);
        }
        for (; i + 8 <= D; i += 8) a0 += ld8(x + i);
        s = hsum8((a0 + a1) + (a2 + a3));
        for (; i < D; i++) s += x[i];
    }
    float m = s / (float)D;
    v8 mv = m - (v8){0};
    a0 = a1 = a2 = a3 = (v8){0};
    for (i = 0; i + 32 <= D; i += 32) {
        v8 c0 = ld8(x + i) - mv, c1 = ld8(x + i + 8) - mv;
        v8 c2 = ld8(x + i + 16) - mv, c3 = ld8(x + i + 24) - mv;
        a0 += c0 * c0; a1 += c1 * c1; a2 += c2 * c2; a3 += c3 * c3;
    }
    for (; i + 8 <= D; i += 8) { v8 c = ld8(x + i) - mv; a0 += c * c; }
    float v = hsum8((a0 + a1) + (a2 + a3));
    for (; i < D; i++) { float c = x[i] - m; v += c * c; }
    *mu = m;
    *rs = 1.0f / sqrtf(v / (float)D + eps);
}

/* Normalize, affine and the activation of one row: y may be x (in place), so no
   restrict here; each element is read before it is written. */
static inline void lna_row(int act, const float *xr, const float *wm, const float *bm,
                           float *yr, int64_t D, float mu, float rs) {
    if (act == 0) {
        /* normalize and affine, the exponentials, then Mish: three loops over chunks of
           the row, not one. One loop's long chain of dependent operations (affine ->
           exponential -> divide) kept too few iterations in flight: 270 -> 234 us for
           [512, 512] on one thread, 140 -> 122 us on two (a C harness). */
        float eb[256];
        for (int64_t c = 0; c < D; c += 256) {
            int64_t n = D - c < 256 ? D - c : 256;
            const float *xc = xr + c, *wc = wm + c, *bc = bm + c;
            float *yc = yr + c;
            #pragma omp simd
            for (int64_t i = 0; i < n; i++) yc[i] = (xc[i] - mu) * rs * wc[i] + bc[i];
            exp_row(yc, eb, n);
            #pragma omp simd
            for (int64_t i = 0; i < n; i++) {
                float z = yc[i], e = eb[i];
                yc[i] = z - 2.0f * z / (e * (e + 2.0f) + 2.0f);
            }
        }
    } else {
        #pragma omp simd
        for (int64_t i = 0; i < D; i++) yr[i] = (xr[i] - mu) * rs * wm[i] + bm[i];
        simnorm_groups(yr, D);
    }
}

/* The row that dropout passes on: (x + lb) * (mask / keep), or x * (mask / keep) */
static inline void dropout_row(const float *restrict x, const float *restrict lb,
                               const uint8_t *restrict mask, float keep, float *restrict y,
                               int64_t D) {
    if (lb) {
        #pragma omp simd
        for (int64_t i = 0; i < D; i++) y[i] = (x[i] + lb[i]) * ((float)mask[i] / keep);
    } else {
        #pragma omp simd
        for (int64_t i = 0; i < D; i++) y[i] = x[i] * ((float)mask[i] / keep);
    }
}

/* R rows of D; row r uses affine row r / rpm of w, b ([M, D]). mean/rstd may be NULL.
   lb (NULL or [M, D] like w): a bias added to each row first, the preceding Linear's,
   so that layer's product need not write it into its output beforehand. mask (NULL or
   [R, D], one byte each): dropout's mask of 0s and 1s, the row then being
   (x + lb) * (mask / keep), as `x * (mask / keep)` after the bias add computes it. */
void lna_forward(int act, const float *restrict x, const float *restrict lb,
                 const uint8_t *restrict mask, float keep,
                 const float *restrict w, const float *restrict b, float *restrict y,
                 float *restrict mean, float *restrict rstd, int64_t R, int64_t D,
                 int64_t rpm, float eps) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * D, *wm = w + (r / rpm) * D, *bm = b + (r / rpm) * D;
        const float *lbm = lb ? lb + (r / rpm) * D : NULL;
        float *yr = y + r * D;
        float mu, rs;
        if (mask) {  /* the dropped-out row into y, normalized there in place */
            dropout_row(xr, lbm, mask + r * D, keep, yr, D);
            xr = yr;
            lbm = NULL;
        }
        /* with lb: x + lb into y, then normalized in place (the row stays in L1) */
        row_stats(xr, lbm, yr, D, eps, &mu, &rs);
        if (lbm) xr = yr;
        lna_row(act, xr, wm, bm, yr, D, mu, rs);
        if (mean) { mean[r] = mu; rstd[r] = rs; }
    }
}

/* Gradients of the above: gx [R, D]; gw, gb and, with lb, glb [M, D] (sums over each
   member's rows, kept per thread and added at the end; glb is the sum of gx's rows).
   With a mask, gx is the gradient before dropout (the LayerNorm input's times
   mask / keep). */
int lna_backward(int act, const float *restrict g, const float *restrict x,
                 const float *restrict lb, const uint8_t *restrict mask, float keep,
                 const float *restrict w, const float *restrict b,
                 const float *restrict mean, const float *restrict rstd, float *restrict gx,
                 float *restrict gw, float *restrict gb, float *restrict glb, int64_t R,
                 int64_t D, int64_t rpm, int64_t M) {
    int nt = omp_get_max_threads();
    int64_t MD = M * D, NP = lb ? 3 : 2;  /* per-thread partial sums: gw, gb (, glb) */
    float *part = (float *)calloc((size_t)nt * NP * MD + (size_t)nt * 4 * D, sizeof(float));
    if (!part) return 1;
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
        float *pw = part + (size_t)t * NP * MD, *pb = pw + MD, *plb = pb + MD;
        float *z = part + (size_t)nt * NP * MD + (size_t)t * 4 * D, *xh = z + D, *gz = xh + D;
        float *xs = gz + D;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            int64_t m = r / rpm;
            const float *xr = x + r * D, *wm = w + m * D, *bm = b + m * D;
            float *pwm = pw + m * D, *pbm = pb + m * D, *gxr = gx + r * D;
            const float *gr = g + r * D;
            float mu = mean[r], rs = rstd[r], s1 = 0.f, s2 = 0.f;
            if (mask) {  /* the forward's input row, as it computed it */
                dropout_row(xr, lb ? lb + m * D : NULL, mask + r * D, keep, xs, D);
                xr = xs;
            } else if (lb) {
                const float *lm = lb + m * D;
                #pragma omp simd
                for (int64_t i = 0; i < D; i++) xs[i] = xr[i] + lm[i];
                xr = xs;
            }
            if (act == 0) {  /* Mish: its derivative fused into one pass */
                /* the exponentials first, in a loop of their own (into gz, overwritten
                   below): in one loop with the rest, the chain of dependent operations
                   kept too few iterations in flight: 1100 -> 855 us for [5 x 512, 512]
                   on two threads (a C harness) */
                int64_t i = 0;
#ifdef HAVE_EXP8
                for (; i + 8 <= D; i += 8)
                    st8(gz + i, exp8((ld8(xr + i) - mu) * rs * ld8(wm + i) + ld8(bm + i)));
#endif
                for (; i < D; i++)
                    gz[i] = exp_clamped(clamp_exp_arg((xr[i] - mu) * rs * wm[i] + bm[i]));
                #pragma omp simd reduction(+:s1, s2)
                for (int64_t i = 0; i < D; i++) {
                    float xhat = (xr[i] - mu) * rs;
                    float zi = xhat * wm[i] + bm[i];
                    float e = gz[i];
                    float rd = 1.0f / (e * (e + 2.0f) + 2.0f);
                    /* mish'(z) = 1 - 2/d + 4 z e (e + 1) / d^2 */
                    float gzi = gr[i] * (1.0f - 2.0f * rd + 4.0f * zi * e * (e + 1.0f) * rd * rd);
                    pwm[i] += gzi * xhat;
                    pbm[i] += gzi;
                    float gxh = gzi * wm[i];
                    s1 += gxh;
                    s2 += gxh * xhat;
                    gz[i] = gxh;
                    xh[i] = xhat;
                }
            } else {
                #pragma omp simd
                for (int64_t i = 0; i < D; i++) {
                    xh[i] = (xr[i] - mu) * rs;
                    z[i] = xh[i] * wm[i] + bm[i];
                }
                simnorm_grad_row(z, gr, gz, D);
                #pragma omp simd reduction(+:s1, s2)
                for (int64_t i = 0; i < D; i++) {
                    pwm[i] += gz[i] * xh[i];
                    pbm[i] += gz[i];
                    float gxh = gz[i] * wm[i];
                    s1 += gxh;
                    s2 += gxh * xh[i];
                    gz[i] = gxh;
                }
            }
            s1 /= (float)D;
            s2 /= (float)D;
            if (mask) {  /* dropout's backward: times mask / keep */
                const uint8_t *mr = mask + r * D;
                #pragma omp simd
                for (int64_t i = 0; i < D; i++)
                    gxr[i] = rs * (gz[i] - s1 - xh[i] * s2) * ((float)mr[i] / keep);
            } else {
                #pragma omp simd
                for (int64_t i = 0; i < D; i++) gxr[i] = rs * (gz[i] - s1 - xh[i] * s2);
            }
            if (lb) {
                float *plm = plb + m * D;
                #pragma omp simd
                for (int64_t i = 0; i < D; i++) plm[i] += gxr[i];
            }
        }
        #pragma omp for schedule(static)
        for (int64_t j = 0; j < NP * MD; j++) {
            float acc = 0.f;
            for (int u = 0; u < nt; u++) acc += part[(size_t)u * NP * MD + j];
            if (j < MD) gw[j] = acc; else if (j < 2 * MD) gb[j - MD] = acc;
            else glb[j - 2 * MD] = acc;
        }
    }
    free(part);
    return 0;
}
"""


# Contract a * b + c into FMAs: the exponential's polynomial is a chain of them.
_CFLAGS = ("-ffp-contract=fast",)


def _library(scalar: bool = False):
    """The kernels' library (None where it cannot be built); `scalar`: built without the
    8-lane AVX code (`-DTDMPC2_SCALAR`), as on CPUs without AVX, for tests to compare."""
    flags = _CFLAGS + (("-DTDMPC2_SCALAR",) if scalar else ())
    lib = native.load("layer_norm_act", _SOURCE, openmp=True, flags=flags)
    if lib is not None and lib.lna_forward.argtypes is None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        f32 = ctypes.c_float
        lib.lna_forward.argtypes = [ctypes.c_int] + [p] * 3 + [f32] + [p] * 5 + [i64] * 3 + [f32]
        lib.lna_forward.restype = None
        lib.lna_backward.argtypes = [ctypes.c_int] + [p] * 4 + [f32] + [p] * 8 + [i64] * 4
        lib.lna_backward.restype = ctypes.c_int
    return lib


_ACTS = {"mish": 0, "simnorm": 1}  # the kernels' activation codes


@torch.compiler.assume_constant_result  # traced graphs take the answer, not the build
def fused_available() -> bool:
    """Whether the fused kernels are built and loaded in this process."""
    return _library() is not None


def _affine_rows(h: torch.Tensor, w: torch.Tensor) -> tuple[int, int] | None:
    """(members M, rows per member) for h [..., D] and w [D] or [M, 1, D] with h [M, N, D]."""
    D = h.shape[-1]
    if w.dim() == 1:
        return 1, h.numel() // D
    if w.dim() == 3 and h.dim() == 3 and w.shape[1] == 1 and w.shape[0] == h.shape[0]:
        return w.shape[0], h.shape[1]
    return None


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class KernelTime:
    """Calls of the fused kernels (forward and backward) and the wall time spent in them,
    counted while `kernel_time()` is active."""

    def __init__(self) -> None:
        self.calls, self.seconds = 0, 0.0


_TIMER: KernelTime | None = None


@contextlib.contextmanager
def kernel_time() -> Iterator[KernelTime]:
    """Count the fused kernels' calls and wall time (perf_counter around each C call, in
    eager code and in compiled graphs, which call the kernels through the ops below):
    what `runners.bench` subtracts to show the ratio to the matmul were they free. The
    cost is two clock reads a call. Not reentrant (an inner one replaces the outer)."""
    global _TIMER
    saved, _TIMER = _TIMER, KernelTime()
    try:
        yield _TIMER
    finally:
        _TIMER = saved


def _timed(fn, *args):
    timer = _TIMER
    if timer is None:
        return fn(*args)
    t0 = time.perf_counter()
    out = fn(*args)
    timer.seconds += time.perf_counter() - t0
    timer.calls += 1
    return out


def _mask_bytes(mask):
    """The kernels' form of a dropout mask: one byte (0 or 1) per value. uint8 masks pass
    as they are, bool ones as a view; a float mask of 0s and 1s is converted (a pass)."""
    if mask is None or mask.dtype == torch.uint8:
        return mask
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    return (mask != 0).to(torch.uint8)


def _forward(act, h, w, b, eps, rpm, save, bias=None, mask=None, keep=1.0):
    """y, and (mean, rstd) per row when `save` (for the backward); `bias` (w's shape) is
    added to h first; then, with `mask` (h's shape), dropout: times mask / keep."""
    mask = _mask_bytes(mask)
    R, D = h.numel() // h.shape[-1], h.shape[-1]
    y = torch.empty_like(h)
    mean = torch.empty(R) if save else None
    rstd = torch.empty(R) if save else None
    with native.profiled(f"tdmpc2::layer_norm_{act}"):
        _timed(_library().lna_forward, _ACTS[act], h.data_ptr(), _ptr(bias), _ptr(mask),
               keep, w.data_ptr(), b.data_ptr(), y.data_ptr(), _ptr(mean), _ptr(rstd),
               R, D, rpm, eps)
    return y, mean, rstd


def _backward(act, grad, h, w, b, mean, rstd, rpm, bias=None, mask=None, keep=1.0):
    """Gradients for h, and for w, b (contiguous, of w's shape), from the saved rows; with
    `bias` (added to h in the forward) also its gradient, else None. With `mask`, h's
    gradient is dropout's input's (times mask / keep)."""
    mask = _mask_bytes(mask)
    R, D = h.numel() // h.shape[-1], h.shape[-1]
    members = w.numel() // D
    grad = grad.contiguous()
    gx, gw, gb = torch.empty_like(h), torch.empty_like(w), torch.empty_like(b)
    glb = None if bias is None else torch.empty_like(bias)
    with native.profiled(f"tdmpc2::layer_norm_{act}_backward"):
        status = _timed(_library().lna_backward, _ACTS[act], grad.data_ptr(),
                        h.data_ptr(), _ptr(bias), _ptr(mask), keep, w.data_ptr(), b.data_ptr(),
                        mean.data_ptr(), rstd.data_ptr(), gx.data_ptr(), gw.data_ptr(),
                        gb.data_ptr(), _ptr(glb), R, D, rpm, members)
    if status != 0:
        raise MemoryError(f"layer_norm_{act}: could not allocate the backward's buffers")
    return gx, gw, gb, glb


class _LayerNormAct(torch.autograd.Function):
    """The fused forward and backward; `bias` (or None) is added to h first, then dropout's
    `mask` (or None) applied. Eager code calls the kernels directly; compiled graphs trace
    this function and call the kernels as the ops below, which have no autograd kernel of
    their own (its Python wrapper would run on every call, gradients or not)."""

    @staticmethod
    def forward(ctx, h, w, b, eps, rpm, act, bias=None, mask=None, keep=1.0):
        wc, bc = w.detach().contiguous(), b.detach().contiguous()
        lbc = None if bias is None else bias.detach().contiguous()
        if torch.compiler.is_compiling():
            y, mean, rstd = torch.ops.tdmpc2.layer_norm_act_v2(h, wc, bc, eps, rpm, act, lbc,
                                                               mask, keep)
        else:
            y, mean, rstd = _forward(act, h, wc, bc, eps, rpm, True, lbc, mask, keep)
        ctx.save_for_backward(h, wc, bc, mean, rstd, lbc, mask)
        ctx.rpm, ctx.act, ctx.w_shape, ctx.keep = rpm, act, w.shape, keep
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, w, b, mean, rstd, lb, mask = ctx.saved_tensors
        if torch.compiler.is_compiling():
            gx, gw, gb, glb = torch.ops.tdmpc2.layer_norm_act_v2_backward(
                grad, h, w, b, mean, rstd, ctx.rpm, ctx.act, lb, mask, ctx.keep)
        else:
            gx, gw, gb, glb = _backward(ctx.act, grad, h, w, b, mean, rstd, ctx.rpm, lb,
                                        mask, ctx.keep)
        need_x, need_w, need_b, _, _, _, need_lb, _, _ = ctx.needs_input_grad
        return (gx if need_x else None, gw.view(ctx.w_shape) if need_w else None,
                gb.view(ctx.w_shape) if need_b else None, None, None, None,
                glb.view(ctx.w_shape) if need_lb else None, None, None)


# Compiled graphs call the kernels through these ops (see the module docstring). They
# are registered with the low-level library API: a call costs about 22 us here against
# about 45 us through `torch.library.custom_op`'s wrappers (dog-run planning makes 166
# such calls at E=1; `rlcore.gemm` registers `tdmpc2::linear` the same way).
_LIB = torch.library.Library("tdmpc2", "FRAGMENT")
#
# The names carry a version, raised with every change of a schema: inductor caches
# compiled graphs on disk, keyed by the graph's code, and a graph compiled with the C++
# wrapper calls an op with exactly the argument list it was compiled for. Under an
# unchanged name, a graph cached before the change would call the op with its old list
# (a crash: v1 had no mask and keep); under a new name the graph's code differs, so no
# stale entry matches. `tests/components/test_fused.py` pins the schemas.
OP_SCHEMAS = {
    "layer_norm_act_v2": "(Tensor h, Tensor w, Tensor b, float eps, int rpm, str act, "
                         "Tensor? bias=None, Tensor? mask=None, float keep=1.0) "
                         "-> (Tensor, Tensor, Tensor)",
    "layer_norm_act_v2_backward": "(Tensor grad, Tensor h, Tensor w, Tensor b, Tensor mean, "
                                  "Tensor rstd, int rpm, str act, Tensor? bias=None, "
                                  "Tensor? mask=None, float keep=1.0) "
                                  "-> (Tensor, Tensor, Tensor, Tensor)",
}
for _name, _schema in OP_SCHEMAS.items():
    _LIB.define(_name + _schema)


def _contiguous(t):
    return None if t is None else t.contiguous()


def _layer_norm_act_op(h, w, b, eps, rpm, act, bias=None, mask=None, keep=1.0):
    """The fused forward as an op that compiled graphs call: (y, mean, rstd per row)."""
    return _forward(act, h.contiguous(), w.contiguous(), b.contiguous(), eps, rpm, True,
                    _contiguous(bias), _contiguous(mask), keep)


def _layer_norm_act_backward_op(grad, h, w, b, mean, rstd, rpm, act, bias=None, mask=None,
                                keep=1.0):
    """The fused backward as an op: gradients for h, w, b and bias (empty without)."""
    gx, gw, gb, glb = _backward(act, grad, h.contiguous(), w.contiguous(), b.contiguous(),
                                mean, rstd, rpm, _contiguous(bias), _contiguous(mask), keep)
    return gx, gw, gb, (glb if glb is not None else h.new_empty(0))


_LIB.impl("layer_norm_act_v2", _layer_norm_act_op, "CPU")
_LIB.impl("layer_norm_act_v2_backward", _layer_norm_act_backward_op, "CPU")


@torch.library.register_fake("tdmpc2::layer_norm_act_v2")
def _(h, w, b, eps, rpm, act, bias=None, mask=None, keep=1.0):
    rows = h.numel() // h.shape[-1]
    return (h.new_empty(h.shape), h.new_empty(rows), h.new_empty(rows))


@torch.library.register_fake("tdmpc2::layer_norm_act_v2_backward")
def _(grad, h, w, b, mean, rstd, rpm, act, bias=None, mask=None, keep=1.0):
    return (h.new_empty(h.shape), w.new_empty(w.shape), b.new_empty(b.shape),
            h.new_empty(0) if bias is None else bias.new_empty(bias.shape))


def fused_applies(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `layer_norm_mish(h, w, b)` / `layer_norm_simnorm` would take a fused kernel."""
    return (h.device.type == "cpu" and h.dtype == torch.float32 and w.dtype == torch.float32
            and b.dtype == torch.float32 and h.numel() > 0
            and w.shape == b.shape and _affine_rows(h, w) is not None
            and w.shape[-1] == h.shape[-1]
            and (torch.compiler.is_compiling() or h.is_contiguous())
            and fused_available())


def _layer_norm_act(act, h, w, b, eps, bias=None, mask=None, keep=1.0):
    if not fused_applies(h, w, b) or (bias is not None and (
            bias.shape != w.shape or bias.dtype != w.dtype)) or (mask is not None and (
            mask.shape != h.shape or mask.dtype not in (h.dtype, torch.uint8, torch.bool)
            or mask.requires_grad
            or not (torch.compiler.is_compiling() or mask.is_contiguous()))):
        return None
    mask = _mask_bytes(mask)  # what the backward saves: a byte per value
    rpm = _affine_rows(h, w)[1]
    keep = float(keep)
    grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad or b.requires_grad
                                        or (bias is not None and bias.requires_grad))
    if grad:
        return _LayerNormAct.apply(h, w, b, float(eps), rpm, act, bias, mask, keep)
    if torch.compiler.is_compiling():
        return torch.ops.tdmpc2.layer_norm_act_v2(h, w, b, float(eps), rpm, act, bias, mask,
                                                  keep)[0]
    return _forward(act, h, w.contiguous(), b.contiguous(), float(eps), rpm, False,
                    _contiguous(bias), mask, keep)[0]


def layer_norm_mish(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                    eps: float = 1e-5, *, bias: torch.Tensor | None = None,
                    dropout_mask: torch.Tensor | None = None, keep: float = 1.0
                    ) -> torch.Tensor | None:
    """mish(layer_norm(h + bias) * w + b) by the fused kernel, or None where it does not
    apply (the caller then runs its PyTorch ops, adding `bias` itself).

    `bias` (optional, w's shape) is the preceding Linear layer's bias: a product run
    without it (a plain matmul into a fresh buffer) plus this add is the Linear, without
    the pass that writes the broadcast bias into the product's output first. Without
    autograd the kernel adds it on the fly.

    `dropout_mask` (optional, h's shape, 0s and 1s as uint8, bool or h's dtype, drawn by
    the caller; the kernel reads bytes, so a float mask costs a conversion) applies dropout
    after the bias: `(h + bias) * (dropout_mask / keep)`, what `rlcore.bernoulli.dropout`
    computes from that mask, in the kernel's first pass over each row; its backward
    multiplies h's gradient by the same factor as it writes it. That saves the pass that
    writes the dropped-out activations (and one over their gradient), and the saved
    activations are h and the mask, as for dropout on its own.

    Shapes: h [..., D] with w, b [D]; or h [M, N, D] with w, b [M, 1, D] (ensembles).
    """
    return _layer_norm_act("mish", h, w, b, eps, bias, dropout_mask, keep)


def layer_norm_simnorm(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5,
                       dim: int = 8, *, bias: torch.Tensor | None = None
                       ) -> torch.Tensor | None:
    """SimNorm(layer_norm(h + bias) * w + b) (softmax over groups of `dim` units) by the
    fused kernel, or None where it does not apply (groups of 8 only). `bias` and shapes as
    `layer_norm_mish`.
    """
    if dim != 8 or h.shape[-1] % 8:
        return None
    return _layer_norm_act("simnorm", h, w, b, eps, bias)
