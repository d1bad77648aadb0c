"""Winograd F(4x4, 3x3) for stride-1 3x3 convolutions in NHWC.

Each 4x4 output tile is computed from a 6x6 input tile with 36 multiplications per (input,
output) channel pair instead of 144: the input tile is transformed (``B^T d B``), multiplied
element-wise with the transformed filter (``G g G^T``) and transformed back (``A^T m A``).
Summed over input channels, the element-wise products become 36 independent GEMMs,
``M[e] = V[e] @ U[e]`` with ``V[e]`` (tiles, C) and ``U[e]`` (C, O), which BLAS runs at full
speed. Interpolation points 0, +-1, +-2 and infinity (Lavin & Gray, 2016) keep the float32
error within a few ulps of direct convolution; the tests bound it against the NumPy backend.
"""

import numpy as np

from . import _gemm
from ._numba_kernels import epilogue_row, kernel
from ._workspace import thread_scratch

TILE = 4          # output pixels per tile side
ALPHA = TILE + 2  # input pixels per tile side
# Tiles transformed and multiplied together: enough rows for efficient GEMMs, few enough that
# the (36, tiles, C) block stays in L2.
BLOCK_TILES = 128

# Transform matrices for F(4x4, 3x3).
BT = np.array([[4, 0, -5, 0, 1, 0],
               [0, -4, -4, 1, 1, 0],
               [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0],
               [0, 2, -1, -2, 1, 0],
               [0, 4, 0, -5, 0, 1]], np.float64)
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 1, 1, 0],
               [0, 1, -1, 2, -2, 0],
               [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]], np.float64)

_BT32 = BT.astype(np.float32)
_AT32 = AT.astype(np.float32)


def transform_weights(weight, packed):
    """(3, 3, C, O) filters -> transformed filters ``G g G^T`` (computed in float64): (36, C, O)
    for BLAS, or with ``packed`` (36, panels, C, NR) panels for numres's GEMM.

    One of the 36 (C, O) products at a time, written into the result: transforming the
    whole (6, 6, C, O) block in float64 at once held ~5x the result in temporaries (190 MB
    for a 512-channel layer), which set the process's peak memory at large batches."""
    _, _, c, o = weight.shape
    if packed:
        out = _gemm.aligned_empty((ALPHA * ALPHA, -(-o // _gemm.NR), c, _gemm.NR))
    else:
        out = np.empty((ALPHA * ALPHA, c, o), np.float32)
    ue = np.empty((c, o), np.float64)
    for i in range(ALPHA):
        for j in range(ALPHA):
            ue[:] = 0.0
            for k in range(3):
                for m in range(3):
                    if G[i, k] * G[j, m] != 0.0:
                        ue += (G[i, k] * G[j, m]) * weight[k, m]       # (C, O), float64
            if packed:
                _gemm.pack_weights(ue.astype(np.float32), out=out[i * ALPHA + j])
            else:
                out[i * ALPHA + j] = ue
    return out


def tiles(h, w):
    return -(-h // TILE), -(-w // TILE)


@kernel
def input_transform(r0, r1, x, bt, v):
    """v[e, t - t0, c] = (B^T d_t B)[e] for the 6x6 input tiles d_t of tile rows [r0, r1).

    A tile row is one (image, tile y) pair; t0 is the first tile of row r0. Padding is 1.
    """
    n_img, h, w, c = x.shape
    th, tw = (h + 3) // 4, (w + 3) // 4
    for row in range(r0, r1):  # rows = (image, tile row)
        n = row // th
        ty = row % th
        d = np.empty((6, 6, c), np.float32)
        tmp = np.empty((6, 6, c), np.float32)
        for tx in range(tw):
            for i in range(6):
                iy = ty * 4 - 1 + i
                for j in range(6):
                    ix = tx * 4 - 1 + j
                    if 0 <= iy < h and 0 <= ix < w:
                        for ci in range(c):
                            d[i, j, ci] = x[n, iy, ix, ci]
                    else:
                        for ci in range(c):
                            d[i, j, ci] = 0.0
            # tmp = B^T d (along rows), then v = tmp B (along columns). These four
            # transform loops stay written out: a shared helper taking row views (d[:, j],
            # m[j::6, t]) lost vectorisation and made the layer 2x slower (measured).
            for i in range(6):
                for j in range(6):
                    for ci in range(c):
                        tmp[i, j, ci] = 0.0
                    for k in range(6):
                        coef = bt[i, k]
                        if coef != 0.0:
                            for ci in range(c):
                                tmp[i, j, ci] += coef * d[k, j, ci]
            t = (row - r0) * tw + tx
            for i in range(6):
                for j in range(6):
                    e = i * 6 + j
                    for ci in range(c):
                        v[e, t, ci] = 0.0
                    for k in range(6):
                        coef = bt[j, k]
                        if coef != 0.0:
                            for ci in range(c):
                                v[e, t, ci] += coef * tmp[i, k, ci]


@kernel
def output_transform(r0, r1, m, at, bias, residual, has_residual, relu, y):
    """y[n, 4ty+i, 4tx+j, :] = relu?((A^T m_t A)[i, j] + bias + residual?), cropped to y.

    For tile rows [r0, r1); ``m`` holds their tiles from index 0, like ``input_transform``.
    """
    n_img, h, w, o = y.shape
    th, tw = (h + 3) // 4, (w + 3) // 4
    for row in range(r0, r1):  # rows = (image, tile row)
        n = row // th
        ty = row % th
        tmp = np.empty((4, 6, o), np.float32)
        acc = np.empty(o, np.float32)
        for tx in range(tw):
            t = (row - r0) * tw + tx
            # tmp = A^T m (along rows)
            for i in range(4):
                for j in range(6):
                    for co in range(o):
                        tmp[i, j, co] = 0.0
                    for k in range(6):
                        coef = at[i, k]
                        if coef != 0.0:
                            e = k * 6 + j
                            for co in range(o):
                                tmp[i, j, co] += coef * m[e, t, co]
            for i in range(4):
                oy = ty * 4 + i
                if oy >= h:
                    break
                for j in range(4):
                    ox = tx * 4 + j
                    if ox >= w:
                        break
                    acc[:] = 0.0
                    for k in range(6):
                        coef = at[j, k]
                        if coef != 0.0:
                            for co in range(o):
                                acc[co] += coef * tmp[i, k, co]
                    r = (n * h + oy) * w + ox
                    dst = y[n, oy, ox]
                    res = residual[r] if has_residual else dst
                    epilogue_row(dst, acc, bias, res, has_residual, relu)


def conv3x3(x, weight, out_channels, epilogue, executor, y):
    """Stride-1, padding-1 3x3 convolution of NHWC ``x`` into ``y`` with a fused epilogue.

    ``weight`` is :func:`transform_weights`'s array (packed 4-D for numres's GEMM, else
    (36, C, O) for BLAS); ``epilogue`` is ``(bias, residual rows (M, O), has_residual,
    relu)``. Each thread takes whole tile rows and runs transform, 36 GEMMs and inverse
    transform on blocks of them, so the transformed tiles stay in cache.
    """
    n, h, w, c = x.shape
    th, tw = tiles(h, w)
    rows_per_block = max(1, BLOCK_TILES // tw)
    own = weight.ndim == 4
    width = weight.shape[1] * _gemm.NR if own else out_channels

    def work(r0, r1):
        for b0 in range(r0, r1, rows_per_block):
            b1 = min(b0 + rows_per_block, r1)
            t = (b1 - b0) * tw
            rows = -(-t // _gemm.MR) * _gemm.MR if own else t   # whole microkernel tiles
            v = thread_scratch("winograd_v", (ALPHA * ALPHA, rows, c))
            mm = thread_scratch("winograd_m", (ALPHA * ALPHA, rows, width))
            input_transform(b0, b1, x, _BT32, v)
            if own:
                _gemm.batched_gemm(v, t, weight, mm)
            else:
                np.matmul(v, weight, out=mm)     # (36, t, C) @ (36, C, O) -> (36, t, O)
            output_transform(b0, b1, mm, _AT32, *epilogue, y)

    executor.run(n * th, work)
    return y
