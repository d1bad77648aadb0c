"""Paths ``BLAS`` and ``BLAS_GROUPED``: gather (where needed), NumPy's BLAS, then the epilogue.

Used where numres's kernels do not run (CPUs without AVX2/AVX-512, ``own_gemm=False``) and
for grouped convolutions with wide groups. How a GEMM is split (:func:`plan`): small ones
across numres's threads, single-threaded BLAS each, by rows of output pixels or by output
channels; large ones as one call on BLAS's own threads, with gathering and epilogue split
across numres's.
"""

import numpy as np

from .._base import nbytes
from .gemm import gather
from .kernels import epilogue_row, kernel


@kernel
def bias_act(m0, m1, c0, c1, y, epi):
    """In place on rows [m0, m1), columns [c0, c1) of (M, O): y = relu?(y + bias + res?)."""
    bias, residual, has_residual, relu = epi
    b = bias[c0:c1]
    for r in range(m0, m1):
        row = y[r, c0:c1]
        res = residual[r, c0:c1] if has_residual else row
        epilogue_row(row, row, b, res, has_residual, relu)


@kernel
def im2col_grouped(r0, r1, x, k, stride, pad, out_w, groups, cols):
    """cols[g, (row - r0) * out_w + ox, (ky, kx, cg)] = x[n, iy, ix, g * Cg + cg] for output
    rows [r0, r1) (row = (image, output y))."""
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
def bias_act_grouped(m0, m1, yg, epi, out):
    """Rows [m0, m1) of out (M, O) from per-group yg[g, r - m0, j], with the epilogue."""
    bias, residual, has_residual, relu = epi
    groups, _, og = yg.shape
    for r in range(m0, m1):
        for g in range(groups):
            cols = slice(g * og, (g + 1) * og)
            dst = out[r, cols]
            res = residual[r, cols] if has_residual else dst
            epilogue_row(dst, yg[g, r - m0], bias[cols], res, has_residual, relu)


# -- BLAS -------------------------------------------------------------------------------------
def plan(m, k, n, threads, tuning):
    """How to run an (m, k) @ (k, n) convolution GEMM: ``"rows"``, ``"columns"`` or
    ``"blas"`` (one call on BLAS's own threads)."""
    if threads == 1 or (m * k * n >= tuning.blas_min_macs and n >= tuning.blas_min_n):
        return "blas"
    if m < threads * tuning.split_rows_min:
        return "columns"
    return "rows"


def gathers(conv):
    """Whether the GEMM input must be gathered (im2col, or a strided 1x1's subsample)."""
    return not (conv.kernel_size == 1 and conv.padding == 0) or conv.stride > 1


def run(be, x, conv, epi, y):
    """Run a convolution on ``BLAS`` (see ``paths.RUNNERS``)."""
    be.step(multiply, be, x, conv, epi, y)


def multiply(be, x, conv, epi, y):
    """Gather (if needed) + GEMM + epilogue, split as :func:`plan` says."""
    n, _, _, c = x.shape
    _, out_h, out_w, o = y.shape
    rows, m = n * out_h, n * out_h * out_w
    y2 = y.reshape(m, o)                          # (N*oh*ow, O): one row per pixel
    gather = gathers(conv)
    ex = be.executor
    tuning = be.tuning

    def block(b0, b1):
        """Output rows [b0, b1): gather, GEMM, epilogue, all while the block is hot."""
        m0, m1 = b0 * out_w, b1 * out_w
        a = (_gathered(be, x, conv, b0, b1, out_h, out_w) if gather
             else x.reshape(m, c)[m0:m1])                  # (rows of block, K)
        np.matmul(a, conv.weight, out=y2[m0:m1])
        bias_act(m0, m1, 0, o, y2, epi)

    how = plan(m, conv.weight.shape[0], o, ex.threads, tuning)
    if how == "columns":
        a = _gathered(be, x, conv, 0, rows, out_h, out_w) if gather else x.reshape(m, c)

        def columns(c0, c1):
            np.matmul(a, conv.weight[:, c0:c1], out=y2[:, c0:c1])
            bias_act(0, m, c0, c1, y2, epi)
        ex.run(o, columns)
    elif how == "rows":
        per_block = max(1, tuning.row_block // out_w)

        def blocks(r0, r1):
            for b0 in range(r0, r1, per_block):
                block(b0, min(b0 + per_block, r1))
        ex.run(rows, blocks)
    else:
        # One large GEMM at a time with BLAS's own threads; gather and epilogue split
        # across ours. Chunks bound the im2col scratch at large batches.
        per_chunk = max(1, tuning.blas_chunk // out_w)
        for b0 in range(0, rows, per_chunk):
            b1 = min(b0 + per_chunk, rows)
            m0, m1 = b0 * out_w, b1 * out_w
            if gather:
                a = be.workspace.get(((b1 - b0) * out_w, conv.weight.shape[0]))
                ex.run(b1 - b0, lambda r0, r1: _gather_into(
                    x, conv, b0 + r0, b0 + r1, out_h, out_w, a[r0 * out_w:r1 * out_w]))
            else:
                a = x.reshape(m, c)[m0:m1]
            np.matmul(a, conv.weight, out=y2[m0:m1])
            ex.run(m1 - m0, lambda r0, r1: bias_act(m0 + r0, m0 + r1, 0, o, y2, epi))


def _gathered(be, x, conv, r0, r1, out_h, out_w):
    """The GEMM input for output rows [r0, r1): im2col windows or a strided subsample."""
    a = be.workspace.get(((r1 - r0) * out_w, conv.weight.shape[0]))
    _gather_into(x, conv, r0, r1, out_h, out_w, a)
    return a


def _gather_into(x, conv, r0, r1, out_h, out_w, a):
    gather(x, conv.kernel_size, conv.stride, conv.padding, out_h, out_w, r0 * out_w,
           r1 * out_w, a)


def events(conv, x, y, threads, tuning):
    """The gathered GEMM inputs, as :func:`multiply` asks for them."""
    n, oh, ow, o = y
    m, k_dim = n * oh * ow, conv.weight.shape[0]
    if not gathers(conv):
        return []
    how = plan(m, k_dim, o, threads, tuning)
    if how == "columns":
        return [("alloc", "gathered", nbytes((m, k_dim))), ("free", "gathered")]
    if how == "rows":
        per_block = max(1, tuning.row_block // ow)
        return [("scratch", "blas_rows", threads * nbytes((per_block * ow, k_dim)))]
    rows = min(m, max(1, tuning.blas_chunk // ow) * ow)
    # the next chunk's buffer is asked for while the previous one is still bound
    return [("alloc", "chunk0", nbytes((rows, k_dim))), ("alloc", "chunk1",
            nbytes((rows, k_dim))), ("free", "chunk0"), ("free", "chunk1")]


# -- BLAS_GROUPED -----------------------------------------------------------------------------
def run_grouped(be, x, conv, epi, y):
    """Run a convolution on ``BLAS_GROUPED`` (see ``paths.RUNNERS``)."""
    be.step(multiply_grouped, be, x, conv, epi, y)


def multiply_grouped(be, x, conv, epi, y):
    """Per block of output rows: im2col into (G, rows, K/G) and G GEMMs."""
    n, _, _, c = x.shape
    _, out_h, out_w, o = y.shape
    y2 = y.reshape(n * out_h * out_w, o)          # (N*oh*ow, O): one row per pixel
    g, k = conv.groups, conv.kernel_size
    per_block = max(1, be.tuning.row_block // out_w)

    def blocks(r0, r1):
        for b0 in range(r0, r1, per_block):
            b1 = min(b0 + per_block, r1)
            mb = (b1 - b0) * out_w
            cols = be.workspace.get((g, mb, k * k * (c // g)))
            yg = be.workspace.get((g, mb, o // g))
            im2col_grouped(b0, b1, x, k, conv.stride, conv.padding, out_w, g, cols)
            np.matmul(cols, conv.weight, out=yg)       # (G, mb, O/G)
            bias_act_grouped(b0 * out_w, b1 * out_w, yg, epi, y2)
    be.executor.run(n * out_h, blocks)


def grouped_events(conv, x, y, threads, tuning):
    """Per block, in each thread's own pool: im2col (G, mb, K/G) and (G, mb, O/G); a block's
    buffers are asked for while the previous block's are still bound."""
    _, _, _, c = x
    _, _, ow, o = y
    g, k = conv.groups, conv.kernel_size
    mb = max(1, tuning.row_block // ow) * ow
    return [("scratch", "grouped_cols", 2 * threads * nbytes((g, mb, k * k * (c // g)))),
            ("scratch", "grouped_y", 2 * threads * nbytes((g, mb, o // g)))]
