"""Path ``GEMM``: a convolution as numres's own GEMM on blocks of gathered output pixels.

The weights are packed once, at load time, into ``nr``-wide column panels (:func:`pack_weights`).
Each thread claims blocks of output pixels, gathers a block's inputs (im2col for kxk
windows, a subsample for strided 1x1s; a 1x1 stride-1 convolution reads the activation as it
lies and gathers nothing), multiplies it with the microkernel and applies bias + residual +
ReLU while the block is still in cache (:func:`conv_pixels`). With few pixels (the deep
layers at small batches) threads claim weight panels instead, so each panel's weights are
read once. :func:`gemm_block` is also the engine of the Winograd path's 36 GEMMs.
"""

from .._base import nbytes
from .._workspace import aligned_empty, thread_scratch
from . import pairs
from .kernels import epilogue_block, kernel
from .microkernel import Finish, Out, Panel, Prefetch, Rows, data_ptr, make_microkernel, plain
from .threads import next_block, work_counters
from .tile import TILE

MR, NR, KC = TILE.mr, TILE.nr, TILE.kc
MR_SHORT, MR_HALF = TILE.short_mr, TILE.half_mr
# The microkernel with the heights each caller picks from: short tiles where a block has
# few rows (gemm_block), half-height tiles for 49-pixel GEMMs (gemm_finish).
_short_or_main = make_microkernel(TILE.vl, NR, (MR, MR_SHORT), TILE.line)
_half_or_main = make_microkernel(TILE.vl, NR, (MR, MR_HALF), TILE.line)


def pack_weights(w, out=None):
    """(K, N) weights -> (ceil(N / NR), K, NR) column panels, zero-padded to whole panels
    (into ``out`` if given); float32, or uint32 bf16 pairs (``pairs.pack``)."""
    k, n = w.shape
    panels = -(-n // NR)
    if out is None:
        packed = aligned_empty((panels, k, NR), w.dtype)    # rows: cache lines
    else:
        packed = out
    whole = n // NR
    # (K, whole*NR) -> (whole, K, NR)
    packed[:whole] = w[:, :whole * NR].reshape(k, whole, NR).transpose(1, 0, 2)
    if whole < panels:
        packed[whole] = 0
        packed[whole, :, :n - whole * NR] = w[:, whole * NR:]
    return packed


def unpack_weights(packed, n):
    """Inverse of :func:`pack_weights`: (panels, K, NR) -> (K, n)."""
    panels, k, nr = packed.shape
    return packed.transpose(1, 0, 2).reshape(k, panels * nr)[:, :n]   # (K, panels*NR)


@kernel
def next_chunk(jp, pc, k, p0, p1, tiles, pf_p1):
    """Where the weights multiplied after chunk (panel ``jp``, depth ``pc``) of panels
    [p0, p1) start, and how each of the chunk's ``tiles`` calls should prefetch a share of
    them: (first float of the share for tile 0, floats per tile, floats per k step). After
    the last chunk: panel ``p1`` if ``p1 < pf_p1`` (taken next), else the first chunk again.

    At small batches a chunk of weights serves only a few row tiles, so they come from
    memory; reading them in bursts when their chunk starts left the core waiting. Spread
    over the current chunk's calls, the next chunk is in cache when it is needed.
    """
    kc = min(KC, k - pc)
    if jp + 1 < p1:
        nxt = ((jp + 1) * k + pc) * NR
    elif pc + KC < k:
        nxt = (p0 * k + pc + KC) * NR
    elif p1 < pf_p1:
        nxt = p1 * k * NR          # the next panel of this thread's share
    else:
        nxt = p0 * k * NR          # the next block of rows starts over
    share = (kc * NR + tiles - 1) // tiles
    return nxt, share, (share + kc - 1) // kc


@kernel
def round_up(rows, mr):
    """``rows`` rounded up to whole tiles of ``mr``."""
    return (rows + mr - 1) // mr * mr


@kernel
def gemm_block(a, rows, bp, p0, p1, c):
    """c[:tiles*MR, p0*NR:p1*NR] = a[:tiles*MR] @ B for column panels [p0, p1) of packed B.

    ``a`` is row-major (M, K) with at least ``tiles * MR`` rows (rows past ``rows`` are
    computed but meaningless); ``c`` is row-major with a row stride of all panels * NR.
    Up to 16 rows may run as short tiles where that pads less (``MR_SHORT``).
    """
    k = a.shape[1]
    ldc = c.shape[1]
    a_ptr, b_ptr, c_ptr = data_ptr(a), data_ptr(bp), data_ptr(c)
    short = rows <= 2 * MR_SHORT and round_up(rows, MR_SHORT) < round_up(rows, MR)
    mr = MR_SHORT if short else MR
    tiles = (rows + mr - 1) // mr
    for pc in range(0, k, KC):
        kc = min(KC, k - pc)
        for jp in range(p0, p1):
            b_off = (jp * k + pc) * NR
            nxt, share, step = next_chunk(jp, pc, k, p0, p1, tiles, p1)
            for t in range(tiles):
                _short_or_main(mr, kc, 1, Rows(a_ptr, t * mr * k + pc, k, 0),
                               Panel(b_ptr, b_off),
                               Out(c_ptr, t * mr * ldc + jp * NR, ldc, pc > 0),
                               plain(c_ptr), Prefetch(nxt + t * share, step))


@kernel
def gemm_finish(a, rows, bp, p0, p1, pf_p1, n_out, epi, y2, m0, c):
    """y2[m0:m0+rows, panels p0..p1] = relu?(a[:rows] @ B + bias + residual?) (``epi``).

    Whole tiles (MR rows of one full NR-column panel) are finished by the microkernel and
    stored straight into ``y2``: no scratch round trip, no separate epilogue pass. Ragged
    tiles (the last rows of the block, a last panel narrower than NR) go through ``c``
    (this thread's (>= tiles*MR, panels*NR) scratch) and :func:`epilogue_block`. Where
    half-height tiles pad less (``MR_HALF``: 49 pixels, a 7x7 map at batch 1), they are used.
    The last chunk prefetches the weights of panel ``p1`` if ``p1 < pf_p1`` (the panel this
    thread likely takes next), else of the first chunk again.
    """
    bias, residual, has_residual, relu = epi
    k = a.shape[1]
    half = round_up(rows, MR_HALF) < round_up(rows, MR)
    mr = MR_HALF if half else MR
    tiles = (rows + mr - 1) // mr
    whole_tiles = rows // mr
    whole_panels = min(p1, n_out // NR)
    ldc = c.shape[1]
    a_ptr, b_ptr, c_ptr = data_ptr(a), data_ptr(bp), data_ptr(c)
    y_ptr, bias_ptr = data_ptr(y2), data_ptr(bias)
    res_ptr = data_ptr(residual) if has_residual else y_ptr
    for pc in range(0, k, KC):
        kc = min(KC, k - pc)
        last = pc + kc >= k
        for jp in range(p0, p1):
            b_off = (jp * k + pc) * NR
            nxt, share, step = next_chunk(jp, pc, k, p0, p1, tiles, pf_p1)
            for t in range(tiles):
                if t < whole_tiles and jp < whole_panels:
                    out, ld, finish = (m0 + t * mr) * n_out + jp * NR, n_out, last
                    dst_ptr = y_ptr
                else:
                    out, ld, finish = t * mr * ldc + jp * NR, ldc, False
                    dst_ptr = c_ptr
                _half_or_main(mr, kc, 1, Rows(a_ptr, t * mr * k + pc, k, 0),
                              Panel(b_ptr, b_off), Out(dst_ptr, out, ld, pc > 0),
                              Finish(finish, bias_ptr, jp * NR, res_ptr, out, ld,
                                     has_residual and finish, relu),
                              Prefetch(nxt + t * share, step))
    c0, c1 = p0 * NR, min(p1 * NR, n_out)
    done = whole_tiles * mr
    if done < rows:           # the ragged last rows, every panel
        epilogue_block(y2, m0 + done, c, done, rows - done, c0, c1, epi)
    if whole_panels < p1:     # the narrow last panel, the whole tiles' rows
        epilogue_block(y2, m0, c, 0, done, max(c0, whole_panels * NR), c1, epi)


@kernel
def gather(x, k, stride, pad, out_h, out_w, m0, m1, a):
    """a[m - m0, (ky, kx, c)] = x[n, oy*s - p + ky, ox*s - p + kx, c] for pixels [m0, m1)
    of the output (m = (n, oy, ox)), 0 outside the image: im2col (k > 1) or the subsample of
    a strided 1x1 convolution (k == 1), row-major as the microkernel reads it. A uint32
    ``a`` gets bf16 pairs of adjacent channels (even C, ``pairs.py``) of float32 ``x``."""
    _, h, w, c = x.shape
    r = pairs.ratio(a) // pairs.ratio(x)     # floats per element of a, per element of x
    kc = k * c                               # x's elements per kernel row
    kd = kc // r                             # a's
    xf = x.ravel()
    for m in range(m0, m1):
        ox = m % out_w
        rest = m // out_w
        oy = rest % out_h
        n = rest // out_h
        dst = a[m - m0]
        ix0 = ox * stride - pad
        lo = max(0, -ix0) * c
        hi = min(k, w - ix0) * c
        for ky in range(k):
            iy = oy * stride - pad + ky
            d = ky * kd
            if iy < 0 or iy >= h or lo >= hi:
                dst[d:d + kd] = 0
                continue
            src = ((n * h + iy) * w + ix0) * c
            if c < 16 and r == 1:  # the 3-channel stem: element copies beat short slices
                for j in range(lo):
                    dst[d + j] = 0
                for j in range(lo, hi):
                    dst[d + j] = xf[src + j]
                for j in range(hi, kc):
                    dst[d + j] = 0
            else:
                dst[d:d + lo // r] = 0
                pairs.store_row(dst[d + lo // r:d + hi // r], xf[src + lo:src + hi])
                dst[d + hi // r:d + kd] = 0


@kernel
def conv_pixels(counters, part, parts, by_panels, mc, x, window, direct, bp, epi, y2, a, c):
    """Every output pixel and panel of a convolution: gather, multiply, epilogue (``epi``).

    Thread ``part`` of ``parts`` claims work with ``threads.next_block``: blocks of ``mc``
    pixels (a multiple of MR), all panels each; or, ``by_panels`` (few pixels: the deep
    layers at small batches), single panels for all pixels, gathered once (``mc`` >= the
    pixels). ``window`` is ``(k, stride, pad, out_h, out_w)``; ``direct``: the activation is
    the GEMM input as it lies (1x1, stride 1), so only a ragged end is copied. ``a`` (mc, K)
    and ``c`` (mc, panels*NR) are this thread's scratch; ``y2`` is the (M, O) output. With
    bf16 pairs (``a`` and ``bp`` uint32, K in pairs), each block's rows are converted into
    ``a`` as they are gathered or copied (in cache, just before they are multiplied).
    """
    k, stride, pad, out_h, out_w = window
    m0, m1, p0, p1, n_out = 0, y2.shape[0], 0, bp.shape[0], y2.shape[1]
    x2 = x.reshape(-1, x.shape[3])
    total = x2.shape[0] if direct else y2.shape[0]
    blocks = p1 - p0 if by_panels else (m1 - m0 + mc - 1) // mc
    started = False
    while True:
        blk = next_block(counters, part, parts, blocks)
        if blk < 0:
            return
        b0, b1 = (m0, m1) if by_panels else (m0 + blk * mc, min(m0 + (blk + 1) * mc, m1))
        rows = b1 - b0
        padded = (rows + MR - 1) // MR * MR
        src, scratch = pairs.block_rows(x2, a, b0, padded, direct and b0 + padded <= total)
        if scratch and not (by_panels and started):  # by panels: one gather serves all
            if direct:
                for i in range(rows):
                    pairs.store_row(a[i], x2[b0 + i])
            else:
                gather(x, k, stride, pad, out_h, out_w, b0, b1, a)
            a[rows:padded] = 0
        started = True
        if by_panels:
            # Prefetch toward the end of this thread's own share of panels.
            share_end = p0 + blocks * (part + 1) // parts
            gemm_finish(src, rows, bp, p0 + blk, p0 + blk + 1, share_end, n_out, epi, y2,
                        b0, c)
        else:
            gemm_finish(src, rows, bp, p0, p1, p1, n_out, epi, y2, b0, c)


@kernel
def batched_gemm(a, rows, bp, c):
    """c[e] = a[e] @ B[e] for each e: ``a`` (E, >= tiles*MR, K), ``bp`` (E, panels, K, NR)
    packed, ``c`` (E, >= tiles*MR, panels*NR). The 36 products of a Winograd block."""
    for e in range(a.shape[0]):
        gemm_block(a[e], rows, bp[e], 0, bp.shape[1], c[e])


# -- the path ---------------------------------------------------------------------------------
def blocking(m, panels, threads, tuning):
    """How the threads share an (m pixels) x (panels) GEMM: ``(by_panels, mc)``.

    By panels where each thread would have fewer than ``tuning.split_rows_min`` pixels:
    all pixels in one block, so each panel's weights are read once (at batch 1 they come
    from memory; two blocks would read them twice). Otherwise blocks of ``mc`` pixels, up
    to ``gemm_block_tiles`` tiles and at least ``blocks_per_thread`` per thread.
    """
    if m < threads * tuning.split_rows_min and panels >= threads:
        return True, -(-m // MR) * MR
    mc = min(tuning.gemm_block_tiles * MR,
             max(1, -(-m // (threads * tuning.blocks_per_thread * MR))) * MR)
    return False, mc


def run(be, x, conv, epi, y):
    """Run a convolution on this path (see ``paths.RUNNERS``)."""
    be.step(multiply, be.executor, be.tuning, x, conv, epi, y)


def multiply(ex, tuning, x, conv, epi, y):
    """Threads claim blocks of pixels to gather, multiply and finish (:func:`conv_pixels`)."""
    n, out_h, out_w, o = y.shape
    m = n * out_h * out_w
    y2 = y.reshape(m, o)                          # (N*oh*ow, O): one row per pixel
    panels, k_dim = conv.weight.shape[:2]
    by_panels, mc = blocking(m, panels, ex.threads, tuning)
    direct = conv.kernel_size == 1 and conv.padding == 0 and conv.stride == 1
    window = (conv.kernel_size, conv.stride, conv.padding, out_h, out_w)
    counters = work_counters(ex.threads)

    def work(part, parts):
        a = thread_scratch("gemm_a", (mc, k_dim), conv.weight.dtype)
        c = thread_scratch("gemm_c", (mc, panels * NR))
        conv_pixels(counters, part, parts, by_panels, mc, x, window, direct, conv.weight,
                    epi, y2, a, c)
    ex.share(work)


def events(conv, x, y, threads, tuning):
    """The memory this path takes beyond its output (``Backend.memory_events``): each
    thread's gathered block and its tile scratch."""
    n, oh, ow, _ = y
    panels, k_dim = conv.weight.shape[:2]
    _, mc = blocking(n * oh * ow, panels, threads, tuning)
    return [("scratch", "gemm_a", threads * nbytes((mc, k_dim))),
            ("scratch", "gemm_c", threads * nbytes((mc, panels * NR)))]
