"""Path ``STEM``: a direct convolution fused with the max pool after it (ResNet's stem).

Threads claim blocks of pooled output rows; each computes the convolution rows those need
into a band of its own (``direct.direct_block``) and pools them at once, so the full-size
convolution output (ResNet-50, batch 32, 320 px: 210 MB) is never stored; rows shared by two
blocks are computed twice.
"""

from .._base import conv_output_size, nbytes
from .._workspace import thread_scratch
from . import padding
from .direct import MR, NR, direct_block
from .kernels import Epilogue, kernel, pool_row
from .threads import next_block, work_counters


@kernel
def conv_direct_pooled(counters, part, parts, qb, xp, k, stride, out_h, out_w, bp, n_out, bias,
                       relu, pool_k, pool_s, pool_p, band, c, out):
    """``direct.conv_direct`` (no residual) followed by max pooling (``pool_k``, ``pool_s``,
    ``pool_p``) into ``out`` (N, pooled H, pooled W, n_out). Threads claim blocks of ``qb``
    pooled rows; each computes the convolution rows those need into its ``band`` (>= (qb - 1)
    * pool_s + pool_k rows of (out_w, n_out)) and pools them. ``c`` as for
    ``direct.conv_direct``.
    """
    pool_h = out.shape[1]
    total = out.shape[0] * pool_h
    panels = bp.shape[0]
    band2 = band.reshape(-1, n_out)                  # (rows * out_w, n_out)
    epi = Epilogue(bias, band2, False, relu)         # no residual: band2 only fills the type
    blocks = (total + qb - 1) // qb
    while True:
        blk = next_block(counters, part, parts, blocks)
        if blk < 0:
            return
        q, q1 = blk * qb, min(blk * qb + qb, total)
        while q < q1:                                 # pooled rows of one image at a time
            n, py0 = q // pool_h, q % pool_h
            py1 = min(pool_h, py0 + q1 - q)
            s0 = max(0, py0 * pool_s - pool_p)
            s1 = min(out_h, (py1 - 1) * pool_s - pool_p + pool_k)
            direct_block(n * out_h + s0, n * out_h + s1, 0, panels, n * out_h + s0, xp, k,
                         stride, out_h, out_w, bp, n_out, epi, band2, c)
            for py in range(py0, py1):
                pool_row(band, s0, out_h, py, pool_k, pool_s, pool_p, out[n, py])
            q += py1 - py0


def band_rows(conv_h, pooled_rows, pool, threads, tuning):
    """``(qb, rows)``: pooled rows per block (``tuning.stem_pool_rows``, fewer where each
    thread would otherwise get fewer than two blocks) and the convolution rows a block
    computes (the last one shared with the next block)."""
    pool_k, pool_s, _ = pool
    qb = max(1, min(tuning.stem_pool_rows, pooled_rows // (2 * threads)))
    return qb, min(conv_h, (qb - 1) * pool_s + pool_k)


def run(be, x, conv, epi, out, pool):
    """Run a convolution and its max pool ``pool`` = (kernel, stride, padding) on this path
    into ``out`` (see ``paths.RUNNERS``); ``epi`` has no residual."""
    xp = padding.padded(be, x, conv, MR)
    be.step(multiply, be.executor, be.tuning, xp, conv, epi, out, pool,
            x.shape[1], x.shape[2])


def multiply(ex, tuning, xp, conv, epi, out, pool, h, w):
    """Threads claim blocks of pooled rows (:func:`conv_direct_pooled`)."""
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    out_h, out_w = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
    threads = ex.threads
    qb, rows = band_rows(out_h, out.shape[0] * out.shape[1], pool, threads, tuning)
    tiles = -(-out_w // MR)
    panels = conv.weight.shape[0]
    counters = work_counters(threads)

    def work(part, parts):
        band = thread_scratch("stem_band", (rows, out_w, conv.out_channels))
        c = thread_scratch("gemm_c", (rows * tiles * MR, panels * NR))
        conv_direct_pooled(counters, part, parts, qb, xp, k, s, out_h, out_w, conv.weight,
                           conv.out_channels, epi.bias, epi.relu, *pool, band, c, out)
    ex.share(work)


def events(conv, x, y, threads, tuning, pool):
    """The padded input, each thread's band of convolution rows and its tile scratch (``y``:
    the pooled output, NHWC)."""
    n, h, w, _ = x
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    oh, ow = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
    _, rows = band_rows(oh, n * y[1], pool, threads, tuning)
    tiles = -(-ow // MR)
    panels = conv.weight.shape[0]
    return padding.events(x, conv, MR) + [
        ("scratch", "stem_band", threads * nbytes((rows, ow, conv.out_channels))),
        ("scratch", "gemm_c", threads * nbytes((rows * tiles * MR, panels * NR))),
        ("free", "padded")]
