"""Numba's compile options, the fused epilogue, and the kernels around the convolutions.

Activations are (N, H, W, C) float32, C-contiguous, so channels are the innermost loop of
every kernel here: those loops are unit-stride and LLVM vectorises them.

Each kernel is serial and releases the GIL; it works on a range of "rows" ``[r0, r1)``, where
a row is one (image, output row) pair or one pixel, and ``threads.Executor`` hands ranges to
threads. ``cache=True`` keeps compiled code on disk, so only the first use on a machine
compiles (moving a function to another module compiles it once more).
"""

from collections import namedtuple

import numpy as np
from numba import njit

#: The options of every compiled function of this package (the one place they are set):
#: cached on disk, GIL released, NumPy's float semantics, no bounds checks.
JIT = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False)
kernel = njit(**JIT)
# Helpers are inlined into each kernel at Numba's level: called across compiled functions,
# their loops were not vectorised.
helper = njit(inline="always", **JIT)

Epilogue = namedtuple("Epilogue", "bias residual has_residual relu")
Epilogue.__doc__ = """What a convolution applies to its result before storing it, as one value
the kernels take: ``relu?(result + bias + residual?)``. ``bias`` (O,); ``residual`` the
(M, O) rows added where ``has_residual`` (a (1, 1) placeholder otherwise, so that every call
has the same types); ``relu`` clamps at zero (NaN stays NaN, as in torch)."""

# A residual placeholder Numba can type when a layer has none.
NO_RESIDUAL = np.zeros((1, 1), np.float32)


def epilogue(bias, residual, relu):
    """The :class:`Epilogue` for ``bias``, optional (M, O) ``residual`` rows and ``relu``."""
    if residual is None:
        return Epilogue(bias, NO_RESIDUAL, False, relu)
    return Epilogue(bias, residual, True, relu)


@helper
def epilogue_row(dst, src, bias, residual, has_residual, relu):
    """dst = relu?(src + bias + residual?) on 1-D rows (dst may be src).

    The branches are taken once per row, outside the element loops, and the zero is a
    float32: either in the loop stops LLVM from vectorising it.
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


@helper
def epilogue_block(y, m0, src, s0, rows, c0, c1, epi):
    """y[m0 + r, c0:c1] = relu?(src[s0 + r, c0:c1] + bias[c0:c1] + residual[m0 + r, c0:c1]?)
    for r < rows, with ``epi`` an :class:`Epilogue`: :func:`epilogue_row` over a block of
    rows, indexing 2-D arrays instead of making a view per row."""
    bias, residual, has_residual, relu = epi
    zero = np.float32(0.0)
    if has_residual:
        if relu:
            for r in range(rows):
                for j in range(c0, c1):
                    y[m0 + r, j] = max(src[s0 + r, j] + bias[j] + residual[m0 + r, j], zero)
        else:
            for r in range(rows):
                for j in range(c0, c1):
                    y[m0 + r, j] = src[s0 + r, j] + bias[j] + residual[m0 + r, j]
    elif relu:
        for r in range(rows):
            for j in range(c0, c1):
                y[m0 + r, j] = max(src[s0 + r, j] + bias[j], zero)
    else:
        for r in range(rows):
            for j in range(c0, c1):
                y[m0 + r, j] = src[s0 + r, j] + bias[j]


@kernel
def batch_norm(m0, m1, x, scale, epi, out):
    """Rows [m0, m1) of (M, C): out = relu?(x * scale + shift + residual?), the shift being
    ``epi``'s bias (the unfolded reference path)."""
    shift, residual, has_residual, relu = epi
    c = x.shape[1]
    scaled = np.empty(c, np.float32)
    for r in range(m0, m1):
        row = x[r]
        for j in range(c):
            scaled[j] = row[j] * scale[j]
        res = residual[r] if has_residual else scaled
        epilogue_row(out[r], scaled, shift, res, has_residual, relu)


@helper
def pool_row(band, y0, h, oy, k, stride, pad, dst_row):
    """One row of NHWC max pooling: dst_row[ox, :] = the max over output row ``oy``'s windows
    of an image of height ``h`` whose rows [y0, y0 + len(band)) are in ``band`` (rows, W, C).
    Padding never wins (torch pads with -inf); NaN wins and stays, as in torch."""
    w, c = band.shape[1], band.shape[2]
    for ox in range(dst_row.shape[0]):
        dst = dst_row[ox]
        dst[:] = -np.inf
        for ky in range(k):
            iy = oy * stride - pad + ky
            if iy < 0 or iy >= h:
                continue
            for kx in range(k):
                ix = ox * stride - pad + kx
                if ix < 0 or ix >= w:
                    continue
                src = band[iy - y0, ix]
                for ci in range(c):
                    v = src[ci]
                    if v > dst[ci] or v != v:
                        dst[ci] = v


@kernel
def max_pool(r0, r1, x, k, stride, pad, out):
    """NHWC max pooling of output rows [r0, r1) (row = (image, output y))."""
    h = x.shape[1]
    out_h = out.shape[1]
    for row in range(r0, r1):
        n = row // out_h
        oy = row % out_h
        pool_row(x[n], 0, h, oy, k, stride, pad, out[n, oy])


@kernel
def nchw_to_nhwc(r0, r1, x, out):
    """Rows (image, y) [r0, r1): out[n, y, x, c] = x[n, c, y, x]."""
    n_img, c, h, w = x.shape
    xf = x.ravel()
    of = out.ravel()
    for row in range(r0, r1):
        n = row // h
        y = row % h
        dst = row * w * c
        for ci in range(c):
            src = ((n * c + ci) * h + y) * w
            for xo in range(w):
                of[dst + xo * c + ci] = xf[src + xo]


@kernel
def mean_pixels(r0, r1, x, out):
    """Images [r0, r1) of (N, P, C): out[n] = mean over the P pixels, summed in float32 in
    pixel order (vectorised over channels)."""
    _, p, c = x.shape
    for n in range(r0, r1):
        acc = out[n]
        acc[:] = 0.0
        for i in range(p):
            row = x[n, i]
            for j in range(c):
                acc[j] += row[j]
        scale = np.float32(1.0 / p)
        for j in range(c):
            acc[j] *= scale
