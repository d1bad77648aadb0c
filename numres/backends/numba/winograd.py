"""Path ``WINOGRAD``: F(4x4, 3x3) for stride-1 3x3 convolutions in NHWC.

Each 4x4 output tile is computed from a 6x6 input tile with 36 multiplications per (input,
output) channel pair instead of 144 (4x fewer): the input tile is transformed (``B^T d B``),
multiplied element-wise with the transformed filter (``G g G^T``) and transformed back
(``A^T m A``). Summed over input channels, the element-wise products become 36 independent
GEMMs, ``M[e] = V[e] @ U[e]`` with ``V[e]`` (tiles, C) and ``U[e]`` (C, O): numres's GEMM
(``gemm.batched_gemm``) where the weights are packed for it, else BLAS. Interpolation points
0, +-1, +-2 and infinity (Lavin & Gray, 2016) keep the float32 error within a few ulps of
direct convolution; the tests bound it against the NumPy backend.
"""

import numpy as np

from .._base import nbytes
from .._workspace import aligned_empty, thread_scratch
from . import gemm
from .kernels import epilogue_block, helper, kernel
from .threads import next_block, work_counters

TILE = 4          # output pixels per tile side
ALPHA = TILE + 2  # input pixels per tile side

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
    whole (6, 6, C, O) block in float64 at once held several times the result in
    temporaries, which set the process's peak memory at large batches."""
    _, _, c, o = weight.shape
    if packed:
        out = aligned_empty((ALPHA * ALPHA, -(-o // gemm.NR), c, gemm.NR))
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
                gemm.pack_weights(ue.astype(np.float32), out=out[i * ALPHA + j])
            else:
                out[i * ALPHA + j] = ue
    return out


def tiles(h, w):
    """4x4 tiles of an h x w output: (rows, columns)."""
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
    another: faster than loops over a coefficient matrix (which test for zeros and
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
def output_transform(r0, r1, m, tmp, acc, epi, y):
    """y[n, 4ty+i, 4tx+j, :] = relu?((A^T m_t A)[i, j] + bias + residual?) (``epi``), cropped
    to y.

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
                epilogue_block(y2, r, acc, 0, cols, 0, o, epi)


@kernel
def claimed_blocks(counters, part, parts, total, per_block, x, weight, d, d2, v, mm, tmp, acc,
                   epi, y):
    """Blocks of ``per_block`` of the ``total`` tile rows, claimed by thread ``part`` of
    ``parts`` (``threads.next_block``): transform, the 36 GEMMs on numres's kernel, inverse
    transform and epilogue. Scratch ``v`` (36, >= block tiles, C), ``mm`` (36, same, O)."""
    tw = (x.shape[2] + 3) // 4
    blocks = (total + per_block - 1) // per_block
    while True:
        blk = next_block(counters, part, parts, blocks)
        if blk < 0:
            return
        b0 = blk * per_block
        b1 = min(b0 + per_block, total)
        input_transform(b0, b1, x, d, d2, v)
        gemm.batched_gemm(v, (b1 - b0) * tw, weight, mm)
        output_transform(b0, b1, mm, tmp, acc, epi, y)


# -- the path ---------------------------------------------------------------------------------
def filters(conv):
    """The convolution's transformed filters, made on first use and kept: at batch 1 the deep
    layers never have enough tiles, and the transformed filters are 4x the plain ones."""
    if conv.winograd is None:
        packed = conv.own_kernels
        plain = gemm.unpack_weights(conv.weight, conv.out_channels) if packed else conv.weight
        c, o = plain.shape[0] // 9, plain.shape[1]
        # (9C, O) rows in (ky, kx, c) order -> (3, 3, C, O)
        conv.winograd = transform_weights(plain.reshape(3, 3, c, o), packed=packed)
    return conv.winograd


def run(be, x, conv, epi, y):
    """Run a convolution on this path (see ``paths.RUNNERS``)."""
    be.step(conv3x3, be.executor, be.tuning, x, filters(conv), conv.out_channels, epi, y)


def conv3x3(ex, tuning, x, weight, out_channels, epi, y):
    """Stride-1, padding-1 3x3 convolution of NHWC ``x`` into ``y`` with a fused epilogue.

    ``weight`` is :func:`transform_weights`'s array (packed 4-D for numres's GEMM, else
    (36, C, O) for BLAS). Threads take blocks of tile rows and run transform, 36 GEMMs and
    inverse transform on each, so the transformed tiles stay in cache.
    """
    n, h, w, c = x.shape
    th, tw = tiles(h, w)
    total = n * th
    rows_per_block = max(1, tuning.winograd_block_tiles // tw)
    if weight.ndim == 4:
        _claimed(ex, tuning, x, weight, out_channels, epi, y, total, tw, rows_per_block)
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
                             thread_scratch("winograd_o", (4, out_channels)), epi, y)

    ex.run(total, work)
    return y


def block_rows(total, tw, weight_bytes, threads, tuning):
    """Tile rows per block on numres's GEMM: about one block per thread, each reading the
    transformed filters once; where those are small enough to re-read per block from cache,
    finer blocks (at least ``winograd_min_block_tiles`` tiles), so a faster thread can take
    over part of a slower one's share."""
    per_block = min(max(1, tuning.winograd_block_tiles // tw), -(-total // threads))
    if weight_bytes <= tuning.winograd_small_filters:
        per_block = min(per_block, max(-(-tuning.winograd_min_block_tiles // tw),
                                       total // (3 * threads)))
    return per_block


def _claimed(ex, tuning, x, weight, out_channels, epi, y, total, tw, rows_per_block):
    """numres's GEMM: blocks claimed by the threads (:func:`claimed_blocks`)."""
    c = x.shape[3]
    threads = ex.threads
    per_block = block_rows(total, tw, weight.nbytes, threads, tuning)
    rows = -(-(per_block * tw) // gemm.MR) * gemm.MR        # whole microkernel tiles
    width = weight.shape[1] * gemm.NR
    counters = work_counters(threads)

    def work(part, parts):
        claimed_blocks(counters, part, parts, total, per_block, x, weight,
                       thread_scratch("winograd_d", (ALPHA, ALPHA, c)),
                       thread_scratch("winograd_d2", (ALPHA, ALPHA, c)),
                       thread_scratch("winograd_v", (ALPHA * ALPHA, rows, c)),
                       thread_scratch("winograd_m", (ALPHA * ALPHA, rows, width)),
                       thread_scratch("winograd_t", (4, ALPHA, out_channels)),
                       thread_scratch("winograd_o", (4, out_channels)), epi, y)
    ex.share(work)


def events(conv, x, y, threads, tuning):
    """The transformed filters made on first use (kept), and each thread's transform and
    GEMM scratch."""
    n, h, w, c = x
    o = y[3]
    th, tw = tiles(h, w)
    total = n * th
    alpha2 = ALPHA ** 2
    packed = conv.own_kernels
    panels = -(-o // gemm.NR)
    weight_bytes = nbytes((alpha2, panels, c, gemm.NR) if packed else (alpha2, c, o))
    events = []
    if conv.winograd is None:
        # made on first use and kept; meanwhile the unpacked (9C, O) filters, one (C, O)
        # float64 product at a time and its float32 copy
        events += [("heap", "winograd_weights", weight_bytes),
                   ("heap", "transform", c * o * (48 if packed else 8)),
                   ("free", "transform")]
    if packed:
        per_block = block_rows(total, tw, weight_bytes, threads, tuning)
        rows = -(-(per_block * tw) // gemm.MR) * gemm.MR
        width = panels * gemm.NR
    else:
        rows, width = max(1, tuning.winograd_block_tiles // tw) * tw, o
    scratch = {"winograd_d": alpha2 * c, "winograd_d2": alpha2 * c,
               "winograd_v": alpha2 * rows * c, "winograd_m": alpha2 * rows * width,
               "winograd_t": 4 * ALPHA * o, "winograd_o": 4 * o}
    return events + [("scratch", slot, threads * size * 4) for slot, size in scratch.items()]
