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
from ._numba_kernels import epilogue_block, helper, kernel
from ._workspace import thread_scratch

TILE = 4          # output pixels per tile side
ALPHA = TILE + 2  # input pixels per tile side
# Tiles transformed and multiplied together: enough rows for efficient GEMMs, few enough that
# the (36, tiles, C) block stays in L2.
BLOCK_TILES = 128
# Transformed filters this small (bytes) stay in L2 when re-read per block, and blocks of at
# least this many tiles then still run the GEMMs efficiently.
SMALL_FILTERS = 1 << 20
MIN_BLOCK_TILES = 28

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


# Float32 constants: an integer literal would make Numba compute the transforms in float64
# (2x the work, and conversions in every loop).
_F2, _F4, _F5, _F8 = np.float32(2), np.float32(4), np.float32(5), np.float32(8)


@helper
def _bt(a0, a1, a2, a3, a4, a5):
    """B^T (a0, ..., a5), one channel: the six rows of F(4x4, 3x3)'s input transform."""
    return (_F4 * a0 - _F5 * a2 + a4, a3 + a4 - _F4 * (a1 + a2), _F4 * (a1 - a2) - a3 + a4,
            _F2 * (a3 - a1) - a2 + a4, _F2 * (a1 - a3) - a2 + a4, _F4 * a1 - _F5 * a3 + a5)


@helper
def _at(a0, a1, a2, a3, a4, a5):
    """A^T (a0, ..., a5), one channel: the four rows of the output transform."""
    return (a0 + a1 + a2 + a3 + a4, a1 - a2 + _F2 * (a3 - a4), a1 + a2 + _F4 * (a3 + a4),
            a1 - a2 + _F8 * (a3 - a4) + a5)


@kernel
def _gather_tile(x, n, iy0, ix0, d):
    """d = the 6x6 input tile at (iy0, ix0) of image n, zeros outside the image."""
    _, h, w, c = x.shape
    for i in range(6):
        iy = iy0 + i
        for j in range(6):
            ix = ix0 + j
            if 0 <= iy < h and 0 <= ix < w:
                for ci in range(c):
                    d[i, j, ci] = x[n, iy, ix, ci]
            else:
                for ci in range(c):
                    d[i, j, ci] = 0.0


@kernel
def input_transform(r0, r1, x, d, d2, v):
    """v[e, t - t0, c] = (B^T d_t B)[e] for the 6x6 input tiles d_t of tile rows [r0, r1).

    A tile row is one (image, tile y) pair; t0 is the first tile of row r0. Padding is 1.
    ``d`` and ``d2`` are (6, 6, C) scratch. B^T is written out as sums (:func:`_bt`), a pass
    over columns then one over rows, each an explicit loop over channels from one array into
    another: 1.7x faster than loops over a coefficient matrix (which test for zeros and
    accumulate in memory).
    """
    n_img, h, w, c = x.shape
    th, tw = (h + 3) // 4, (w + 3) // 4
    for row in range(r0, r1):  # rows = (image, tile row)
        n = row // th
        ty = row % th
        iy0 = ty * 4 - 1
        for tx in range(tw):
            ix0 = tx * 4 - 1
            # Columns: d2[:, j] = B^T tile[:, j]; an inner tile is read from the image itself,
            # an edge tile is gathered first, with zeros outside.
            if iy0 >= 0 and iy0 + 6 <= h and ix0 >= 0 and ix0 + 6 <= w:
                for j in range(6):
                    for ci in range(c):
                        u0, u1, u2, u3, u4, u5 = _bt(
                            x[n, iy0, ix0 + j, ci], x[n, iy0 + 1, ix0 + j, ci],
                            x[n, iy0 + 2, ix0 + j, ci], x[n, iy0 + 3, ix0 + j, ci],
                            x[n, iy0 + 4, ix0 + j, ci], x[n, iy0 + 5, ix0 + j, ci])
                        d2[0, j, ci], d2[1, j, ci], d2[2, j, ci] = u0, u1, u2
                        d2[3, j, ci], d2[4, j, ci], d2[5, j, ci] = u3, u4, u5
            else:
                _gather_tile(x, n, iy0, ix0, d)
                for j in range(6):
                    for ci in range(c):
                        u0, u1, u2, u3, u4, u5 = _bt(d[0, j, ci], d[1, j, ci], d[2, j, ci],
                                                     d[3, j, ci], d[4, j, ci], d[5, j, ci])
                        d2[0, j, ci], d2[1, j, ci], d2[2, j, ci] = u0, u1, u2
                        d2[3, j, ci], d2[4, j, ci], d2[5, j, ci] = u3, u4, u5
            for i in range(6):          # rows: d[i, j] = (d2[i, :] B)[j]
                for ci in range(c):
                    u0, u1, u2, u3, u4, u5 = _bt(d2[i, 0, ci], d2[i, 1, ci], d2[i, 2, ci],
                                                 d2[i, 3, ci], d2[i, 4, ci], d2[i, 5, ci])
                    d[i, 0, ci], d[i, 1, ci], d[i, 2, ci] = u0, u1, u2
                    d[i, 3, ci], d[i, 4, ci], d[i, 5, ci] = u3, u4, u5
            # Then one plain copy per element: six interleaved store streams into ``v``
            # in the loop above were slower than this extra pass.
            t = (row - r0) * tw + tx
            for i in range(6):
                for j in range(6):
                    for ci in range(c):
                        v[6 * i + j, t, ci] = d[i, j, ci]


@kernel
def output_transform(r0, r1, m, tmp, acc, bias, residual, has_residual, relu, y):
    """y[n, 4ty+i, 4tx+j, :] = relu?((A^T m_t A)[i, j] + bias + residual?), cropped to y.

    For tile rows [r0, r1); ``m`` holds their tiles from index 0, like ``input_transform``.
    ``tmp`` (4, 6, O) and ``acc`` (4, O) are scratch; A^T is written out (:func:`_at`).
    """
    n_img, h, w, o = y.shape
    th, tw = (h + 3) // 4, (w + 3) // 4
    y2 = y.reshape(n_img * h * w, o)
    for row in range(r0, r1):  # rows = (image, tile row)
        n = row // th
        ty = row % th
        for tx in range(tw):
            t = (row - r0) * tw + tx
            for j in range(6):          # columns: tmp[:, j] = A^T m[:, j]
                for co in range(o):
                    u0, u1, u2, u3 = _at(m[j, t, co], m[6 + j, t, co], m[12 + j, t, co],
                                         m[18 + j, t, co], m[24 + j, t, co], m[30 + j, t, co])
                    tmp[0, j, co], tmp[1, j, co], tmp[2, j, co], tmp[3, j, co] = u0, u1, u2, u3
            cols = min(4, w - tx * 4)
            for i in range(min(4, h - ty * 4)):     # rows: four output pixels, then finish
                for co in range(o):
                    u0, u1, u2, u3 = _at(tmp[i, 0, co], tmp[i, 1, co], tmp[i, 2, co],
                                         tmp[i, 3, co], tmp[i, 4, co], tmp[i, 5, co])
                    acc[0, co], acc[1, co], acc[2, co], acc[3, co] = u0, u1, u2, u3
                r = (n * h + ty * 4 + i) * w + tx * 4
                epilogue_block(y2, r, acc, 0, cols, 0, o, bias, residual, has_residual, relu)


@kernel
def claimed_blocks(counters, part, parts, total, per_block, x, weight, d, d2, v, mm, tmp, acc,
                   bias, residual, has_residual, relu, y):
    """Blocks of ``per_block`` of the ``total`` tile rows, claimed by thread ``part`` of
    ``parts`` (``_gemm.next_block``): transform, the 36 GEMMs on numres's kernel, inverse
    transform and epilogue. Scratch ``v`` (36, >= block tiles, C), ``mm`` (36, same, O)."""
    tw = (x.shape[2] + 3) // 4
    blocks = (total + per_block - 1) // per_block
    while True:
        blk = _gemm.next_block(counters, part, parts, blocks)
        if blk < 0:
            return
        b0 = blk * per_block
        b1 = min(b0 + per_block, total)
        input_transform(b0, b1, x, d, d2, v)
        _gemm.batched_gemm(v, (b1 - b0) * tw, weight, mm)
        output_transform(b0, b1, mm, tmp, acc, bias, residual, has_residual, relu, y)


def conv3x3(x, weight, out_channels, epilogue, executor, y):
    """Stride-1, padding-1 3x3 convolution of NHWC ``x`` into ``y`` with a fused epilogue.

    ``weight`` is :func:`transform_weights`'s array (packed 4-D for numres's GEMM, else
    (36, C, O) for BLAS); ``epilogue`` is ``(bias, residual rows (M, O), has_residual,
    relu)``. Threads take blocks of tile rows and run transform, 36 GEMMs and inverse
    transform on each, so the transformed tiles stay in cache.
    """
    n, h, w, c = x.shape
    th, tw = tiles(h, w)
    total = n * th
    rows_per_block = max(1, BLOCK_TILES // tw)
    if weight.ndim == 4:
        _claimed(x, weight, out_channels, epilogue, executor, y, total, tw, rows_per_block)
        return y

    def work(r0, r1):
        for b0 in range(r0, r1, rows_per_block):
            b1 = min(b0 + rows_per_block, r1)
            t = (b1 - b0) * tw
            v = thread_scratch("winograd_v", (ALPHA * ALPHA, t, c))
            mm = thread_scratch("winograd_m", (ALPHA * ALPHA, t, out_channels))
            input_transform(b0, b1, x, thread_scratch("winograd_d", (ALPHA, ALPHA, c)),
                            thread_scratch("winograd_d2", (ALPHA, ALPHA, c)), v)
            np.matmul(v, weight, out=mm)     # (36, t, C) @ (36, C, O) -> (36, t, O)
            output_transform(b0, b1, mm, thread_scratch("winograd_t", (4, ALPHA, out_channels)),
                             thread_scratch("winograd_o", (4, out_channels)), *epilogue, y)

    executor.run(total, work)
    return y


def _claimed(x, weight, out_channels, epilogue, executor, y, total, tw, rows_per_block):
    """numres's GEMM path: blocks claimed by the threads (:func:`claimed_blocks`). Where the
    transformed filters are small enough to re-read per block from cache, blocks are cut
    finer (at least ``MIN_BLOCK_TILES`` tiles), so a faster thread can take over part of a
    slower one's share; otherwise about one block per thread, each reading them once."""
    c = x.shape[3]
    threads = executor.threads
    per_block = min(rows_per_block, -(-total // threads))
    if weight.nbytes <= SMALL_FILTERS:
        per_block = min(per_block, max(-(-MIN_BLOCK_TILES // tw), total // (3 * threads)))
    rows = -(-(per_block * tw) // _gemm.MR) * _gemm.MR       # whole microkernel tiles
    width = weight.shape[1] * _gemm.NR
    counters = _gemm.work_counters(threads)

    def work(part, parts):
        claimed_blocks(counters, part, parts, total, per_block, x, weight,
                       thread_scratch("winograd_d", (ALPHA, ALPHA, c)),
                       thread_scratch("winograd_d2", (ALPHA, ALPHA, c)),
                       thread_scratch("winograd_v", (ALPHA * ALPHA, rows, c)),
                       thread_scratch("winograd_m", (ALPHA * ALPHA, rows, width)),
                       thread_scratch("winograd_t", (4, ALPHA, out_channels)),
                       thread_scratch("winograd_o", (4, out_channels)), *epilogue, y)
    executor.share(work)
