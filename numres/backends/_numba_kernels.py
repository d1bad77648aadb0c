"""Numba kernels for the NHWC CPU backend: everything around the GEMMs.

Activations are (N, H, W, C) float32, C-contiguous, so channels are the innermost loop of
every kernel here: those loops are unit-stride and LLVM vectorises them.

Each kernel is serial and releases the GIL; it works on a range of "rows" ``[r0, r1)``, where
a row is one (image, output row) pair, and :mod:`._parallel` hands ranges to threads. Kernels
that fill a per-block scratch buffer (``im2col``, ``subsample``) write it relative to ``r0``.
``cache=True`` keeps compiled code on disk, so only the first use on a machine compiles.
"""

import numpy as np
from numba import njit

kernel = njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
# Helpers are inlined into each kernel at Numba's level: called across compiled functions,
# their loops were not vectorised (4x slower, measured).
helper = njit(inline="always", cache=True, nogil=True, error_model="numpy",
              boundscheck=False)


@kernel
def im2col(r0, r1, x, k, stride, pad, out_w, cols):
    """cols[(row - r0) * out_w + ox, (ky, kx, c)] = x[n, oy*s - p + ky, ox*s - p + kx, c].

    Zero outside the image. In NHWC the k taps of one kernel row are k*C contiguous floats,
    so each (output pixel, kernel row) is one contiguous copy, clipped at the border. Short
    runs (the 3-channel stem: 21 floats) are copied element by element on flat indices,
    which is 2.5x faster there than slice assignment; long runs use slices (memcpy-like).
    """
    n_img, h, w, c = x.shape
    out_h = (h + 2 * pad - k) // stride + 1
    kc = k * c
    width = k * kc
    xf = x.ravel()
    cf = cols.ravel()
    for row in range(r0, r1):
        n = row // out_h
        oy = row % out_h
        for ox in range(out_w):
            dst0 = ((row - r0) * out_w + ox) * width
            ix0 = ox * stride - pad
            lo = max(0, -ix0) * c
            hi = min(k, w - ix0) * c
            for ky in range(k):
                iy = oy * stride - pad + ky
                d = dst0 + ky * kc
                if iy < 0 or iy >= h or lo >= hi:
                    cf[d:d + kc] = 0.0
                    continue
                src = ((n * h + iy) * w + ix0) * c
                if c < 16:
                    for j in range(lo):
                        cf[d + j] = 0.0
                    for j in range(lo, hi):
                        cf[d + j] = xf[src + j]
                    for j in range(hi, kc):
                        cf[d + j] = 0.0
                else:
                    cf[d:d + lo] = 0.0
                    cf[d + lo:d + hi] = xf[src + lo:src + hi]
                    cf[d + hi:d + kc] = 0.0


@kernel
def im2col_grouped(r0, r1, x, k, stride, pad, out_w, groups, cols):
    """cols[g, (row - r0) * out_w + ox, (ky, kx, cg)] = x[n, iy, ix, g * Cg + cg]."""
    n_img, h, w, c = x.shape
    out_h = (h + 2 * pad - k) // stride + 1
    cg = c // groups
    for row in range(r0, r1):
        n = row // out_h
        oy = row % out_h
        for ox in range(out_w):
            r = (row - r0) * out_w + ox
            for ky in range(k):
                iy = oy * stride - pad + ky
                for kx in range(k):
                    ix = ox * stride - pad + kx
                    base = (ky * k + kx) * cg
                    if 0 <= iy < h and 0 <= ix < w:
                        for g in range(groups):
                            cols[g, r, base:base + cg] = x[n, iy, ix, g * cg:(g + 1) * cg]
                    else:
                        for g in range(groups):
                            cols[g, r, base:base + cg] = 0.0


@kernel
def subsample(r0, r1, x, stride, out_w, out):
    """out[(row - r0) * out_w + ox, :] = x[n, oy*s, ox*s, :] (a strided 1x1 conv's input)."""
    h = x.shape[1]
    out_h = (h - 1) // stride + 1
    for row in range(r0, r1):
        n = row // out_h
        oy = row % out_h
        for ox in range(out_w):
            out[(row - r0) * out_w + ox, :] = x[n, oy * stride, ox * stride, :]


@helper
def epilogue_row(dst, src, bias, residual, has_residual, relu):
    """dst = relu?(src + bias + residual?) on 1-D rows (dst may be src).

    The branches are taken once per row, outside the element loops, and the zero is a
    float32: either in the loop stops LLVM from vectorising it (measured 4-9x slower).
    """
    zero = np.float32(0.0)
    n = dst.size
    if has_residual:
        if relu:
            for j in range(n):
                dst[j] = max(src[j] + bias[j] + residual[j], zero)
        else:
            for j in range(n):
                dst[j] = src[j] + bias[j] + residual[j]
    elif relu:
        for j in range(n):
            dst[j] = max(src[j] + bias[j], zero)
    else:
        for j in range(n):
            dst[j] = src[j] + bias[j]


@kernel
def bias_act(m0, m1, c0, c1, y, bias, residual, has_residual, relu):
    """In place on rows [m0, m1), columns [c0, c1) of (M, O): y = relu?(y + bias + res?)."""
    b = bias[c0:c1]
    for r in range(m0, m1):
        row = y[r, c0:c1]
        res = residual[r, c0:c1] if has_residual else row
        epilogue_row(row, row, b, res, has_residual, relu)


@kernel
def bias_act_grouped(m0, m1, yg, bias, residual, has_residual, relu, out):
    """Rows [m0, m1) of out (M, O) from per-group yg[g, r - m0, j], with the epilogue."""
    groups, _, og = yg.shape
    for r in range(m0, m1):
        for g in range(groups):
            cols = slice(g * og, (g + 1) * og)
            dst = out[r, cols]
            res = residual[r, cols] if has_residual else dst
            epilogue_row(dst, yg[g, r - m0], bias[cols], res, has_residual, relu)


@kernel
def batch_norm(m0, m1, x, scale, shift, residual, has_residual, relu, out):
    """Rows [m0, m1) of (M, C): out = relu?(x * scale + shift + residual?) (unfolded path)."""
    c = x.shape[1]
    scaled = np.empty(c, np.float32)
    for r in range(m0, m1):
        row = x[r]
        for j in range(c):
            scaled[j] = row[j] * scale[j]
        res = residual[r] if has_residual else scaled
        epilogue_row(out[r], scaled, shift, res, has_residual, relu)


@kernel
def max_pool(r0, r1, x, k, stride, pad, out):
    """NHWC max pooling of output rows [r0, r1); padding never wins (torch pads with -inf)."""
    n_img, h, w, c = x.shape
    _, out_h, out_w, _ = out.shape
    for row in range(r0, r1):
        n = row // out_h
        oy = row % out_h
        for ox in range(out_w):
            dst = out[n, oy, ox]
            dst[:] = -np.inf
            for ky in range(k):
                iy = oy * stride - pad + ky
                if iy < 0 or iy >= h:
                    continue
                for kx in range(k):
                    ix = ox * stride - pad + kx
                    if ix < 0 or ix >= w:
                        continue
                    src = x[n, iy, ix]
                    for ci in range(c):
                        v = src[ci]
                        # NaN wins and stays, as in torch
                        if v > dst[ci] or v != v:
                            dst[ci] = v


@kernel
def nchw_to_nhwc(r0, r1, x, out):
    """Rows (image, y) [r0, r1): out[n, y, x, c] = x[n, c, y, x]."""
    n_img, c, h, w = x.shape
    for row in range(r0, r1):
        n = row // h
        y = row % h
        for xo in range(w):
            for ci in range(c):
                out[n, y, xo, ci] = x[n, ci, y, xo]
