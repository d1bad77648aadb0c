"""Path ``DIRECT``: a convolution without im2col, the microkernel reading the (padded) input.

For one kernel row ``ky``, the ``k * C`` inputs a pixel needs are contiguous in the padded
NHWC input, and neighbouring output pixels start ``stride * C`` floats apart: so the
microkernel reads A straight from the image with that row stride, in ``k`` runs (one per
kernel row) without leaving its registers. Used where the output rows are whole tiles (no
tile row wasted, so skipping the gather pays) and for inputs with few channels (the stem),
see ``paths.choose_path``.
"""

from .._base import nbytes
from .._workspace import thread_scratch
from . import padding, pairs
from .kernels import epilogue_block, kernel
from .microkernel import Finish, Out, Panel, Prefetch, Rows, data_ptr, make_microkernel, plain
from .threads import next_block, work_counters
from .tile import TILE

MR, NR = TILE.mr, TILE.nr
_microkernel = make_microkernel(TILE.vl, NR, (MR,), TILE.line)


@kernel
def conv_direct(counters, part, parts, by_panels, rows, rb, xp, k, stride, out_h, out_w, bp,
                n_out, epi, y2, c):
    """Output rows [0, rows) (row = n * out_h + oy) in blocks of ``rb`` rows, claimed by
    thread ``part`` of ``parts`` with ``threads.next_block`` (:func:`direct_block` for
    each). ``by_panels`` (few rows, large weights): threads claim single panels instead, each
    for all rows (``rb`` = ``rows``), so the weights are read once in all. ``xp`` from
    ``padding.pad_input`` (or the input itself where no tile reads outside it); ``c``
    (rb * tiles * MR, panels * NR) is this thread's scratch for ragged tiles.
    """
    panels = bp.shape[0]
    blocks = panels if by_panels else (rows + rb - 1) // rb
    while True:
        blk = next_block(counters, part, parts, blocks)
        if blk < 0:
            return
        if by_panels:
            direct_block(0, rows, blk, blk + 1, 0, xp, k, stride, out_h, out_w, bp, n_out,
                         epi, y2, c)
        else:
            direct_block(blk * rb, min(blk * rb + rb, rows), 0, panels, 0, xp, k, stride,
                         out_h, out_w, bp, n_out, epi, y2, c)


@kernel
def direct_block(b0, b1, p0, p1, row0, xp, k, stride, out_h, out_w, bp, n_out, epi, y2, c):
    """Output rows [b0, b1), panels [p0, p1) of :func:`conv_direct`, panel by panel, so one
    panel's weights serve the block's tiles from cache (the stem: 147 x 32 floats in L1 for
    a row; a 3x3 layer: a panel in L2 for a dozen tiles) while the next panel is prefetched
    (``gemm.next_chunk``'s scheme). Output row ``r`` is stored at row ``r - row0`` of ``y2``
    (and of the residual): a band of rows (``stem.conv_direct_pooled``) or the whole map."""
    bias, residual, has_residual, relu = epi
    _, hp, wp, ch = xp.shape
    panels = bp.shape[0]
    kc = k * ch
    kdim = k * kc
    lda = stride * ch
    ldc = c.shape[1]
    tiles = (out_w + MR - 1) // MR
    x_ptr, b_ptr, c_ptr = data_ptr(xp), data_ptr(bp), data_ptr(c)
    y_ptr, bias_ptr = data_ptr(y2), data_ptr(bias)
    res_ptr = data_ptr(residual) if has_residual else y_ptr
    whole_tiles = out_w // MR
    whole_panels = n_out // NR
    done = whole_tiles * MR
    calls = (b1 - b0) * tiles
    share = (kdim * NR + calls - 1) // calls
    pf_step = (share + kdim - 1) // kdim
    for jp in range(p0, p1):
        nxt = (jp + 1) * kdim * NR if jp + 1 < panels else 0
        weights = Panel(b_ptr, jp * kdim * NR)
        for r in range(b0, b1):
            n, oy = r // out_h, r % out_h
            for t in range(tiles):
                a = Rows(x_ptr, ((n * hp + oy * stride) * wp + t * MR * stride) * ch, lda,
                         wp * ch)
                pf = Prefetch(nxt + ((r - b0) * tiles + t) * share, pf_step)
                if t < whole_tiles and jp < whole_panels:
                    # A whole tile: finished by the microkernel, stored into the output.
                    out = ((r - row0) * out_w + t * MR) * n_out + jp * NR
                    _microkernel(MR, kc, k, a, weights, Out(y_ptr, out, n_out, False),
                                 Finish(True, bias_ptr, jp * NR, res_ptr, out, n_out,
                                        has_residual, relu), pf)
                else:
                    # A ragged tile: into the scratch, finished below.
                    tile = ((r - b0) * tiles + t) * MR
                    _microkernel(MR, kc, k, a, weights,
                                 Out(c_ptr, tile * ldc + jp * NR, ldc, False), plain(c_ptr), pf)
    c0, c1 = p0 * NR, min(p1 * NR, n_out)
    for r in range(b0, b1):
        tile = (r - b0) * tiles * MR
        m = (r - row0) * out_w
        if done < out_w:
            epilogue_block(y2, m + done, c, tile + done, out_w - done, c0, c1, epi)
        if whole_panels < p1:
            epilogue_block(y2, m, c, tile, done, max(c0, whole_panels * NR), c1, epi)


# -- the path ---------------------------------------------------------------------------------
def reads_unpadded(conv, out_w):
    """Whether every tile reads inside the input itself, so no padded copy is needed: a
    strided 1x1 convolution whose output rows are whole tiles."""
    return conv.padding == 0 and out_w % MR == 0


def blocking(rows, tiles, weight_bytes, panels, threads, tuning):
    """How the threads share ``rows`` output rows of ``tiles`` tiles: ``(by_panels, rb)``.

    Few tiles and more weights than fit in L2 (the deep layers at small batches): threads
    take panels for all rows, so the weights are read once, not per block. Otherwise blocks
    of ``rb`` rows of at most ``direct_block_tiles`` tiles (sharing one panel from cache),
    at least ``blocks_per_thread`` per thread.
    """
    by_panels = (rows * tiles < 2 * threads * tuning.direct_block_tiles
                 and weight_bytes > tuning.direct_panel_bytes and panels >= 2 * threads)
    if by_panels:
        return True, rows
    return False, max(1, min(tuning.direct_block_tiles // tiles,
                             rows // (threads * tuning.blocks_per_thread)))


def run(be, x, conv, epi, y):
    """Run a convolution on this path (see ``paths.RUNNERS``)."""
    if not reads_unpadded(conv, y.shape[2]):
        xp = padding.padded(be, x, conv, MR)
    else:
        xp = pairs.converted(be, x) if conv.pairs else x
    be.step(multiply, be.executor, be.tuning, xp, conv, epi, y)


def multiply(ex, tuning, xp, conv, epi, y):
    """Threads claim blocks of output rows (:func:`conv_direct`)."""
    n, out_h, out_w, o = y.shape
    y2 = y.reshape(n * out_h * out_w, o)          # (N*oh*ow, O): one row per pixel
    panels = conv.weight.shape[0]
    tiles = -(-out_w // MR)
    rows = n * out_h
    by_panels, rb = blocking(rows, tiles, conv.weight.nbytes, panels, ex.threads, tuning)
    counters = work_counters(ex.threads)

    def work(part, parts):
        scratch = thread_scratch("gemm_c", (rb * tiles * MR, panels * NR))
        conv_direct(counters, part, parts, by_panels, rows, rb, xp, conv.kernel_size,
                    conv.stride, out_h, out_w, conv.weight, o, epi, y2, scratch)
    ex.share(work)


def events(conv, x, y, threads, tuning):
    """The padded input (unless read in place: then, with bf16 pairs, the converted input)
    and each thread's ragged-tile scratch."""
    n, oh, ow, _ = y
    panels = conv.weight.shape[0]
    tiles = -(-ow // MR)
    _, rb = blocking(n * oh, tiles, conv.weight.nbytes, panels, threads, tuning)
    if not reads_unpadded(conv, ow):
        copy, name = padding.events(x, conv, MR), "padded"
    else:
        copy, name = (pairs.events(x) if conv.pairs else []), "pairs"
    return copy + [("scratch", "gemm_c", threads * nbytes((rb * tiles * MR, panels * NR)))] \
        + [("free", name)] * bool(copy)
