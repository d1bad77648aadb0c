"""The fast CPU backend: NHWC activations, numres's own GEMM, Numba for everything else.

Layout choice: with channels last, a 1x1 convolution is one GEMM on the activation as it lies
in memory, ``(N*H*W, C) @ (C, O)``, and its result is already the next layer's NHWC input.
A kxk convolution gathers its windows per block of output pixels (im2col) into the GEMM;
the stem (3 channels), stride-2 3x3 layers and strided 1x1s whose output rows are whole
tiles are computed from the (padded) input without gathering.
The GEMM is ``_gemm.py``'s FMA microkernel with weights packed once at load time; bias,
residual add and ReLU are applied while each block is still in cache. A stride-1 3x3
convolution with enough tiles uses Winograd F(4x4, 3x3) instead (2.25x fewer multiplies).
Grouped convolutions with 1-8 channels per group put whole groups in each vector
(``_grouped.py``); up to 32 per group run per group on the GEMM kernel, directly on the
padded input; wider groups, the final linear layer, and CPUs without AVX2/AVX-512 use BLAS.
Scratch buffers are reused across layers and calls (``_workspace.py``).

Threads: each layer's blocks are shared by numres's threads (``_parallel.py``), each taking
its own share first and then what the other has not started (``_gemm.next_block``); BLAS,
where it runs, is single-threaded inside them or alone on its own threads, never both at
once. The first pass per input shape is recorded and later ones replay it (``_replay.py``).
``NUMRES_NUM_THREADS``, else ``OMP_NUM_THREADS``, else every CPU of the process;
``NUMRES_NUM_THREADS`` also sets BLAS's count (through threadpoolctl).
"""

import contextlib
import os
import sys
import threading
from dataclasses import dataclass, field

import numpy as np

from ..errors import BackendUnavailable
from ._base import (Backend, compose_conv_pool, conv_output_size, nbytes,
                    workspace_free_sizes)
from ._workspace import Workspace, thread_scratch

try:
    import numba  # noqa: F401  (the kernels below need it)
except ImportError as exc:  # pragma: no cover - exercised where numba is absent
    raise BackendUnavailable("the 'numba' backend needs Numba: pip install numba") from exc

from . import _gemm
from . import _grouped
from . import _numba_kernels as K
from . import _replay
from . import _winograd
from ._parallel import default_threads, shared


@dataclass
class Tuning:
    """How the backend splits work; defaults chosen by timing whole networks (ResNet-18/50,
    batch 1 and 8) on 2 cores, every variant interleaved in one process."""

    #: GEMMs with at least this many multiply-adds and ``blas_min_n`` output channels run as
    #: one call on BLAS's own threads (they share packed weights); smaller ones run faster
    #: split across numres's threads, single-threaded BLAS each.
    blas_min_macs: int = 200_000_000
    blas_min_n: int = 128
    #: Output pixels per row block when numres's threads split a GEMM by rows.
    row_block: int = 1024
    #: Output pixels per chunk when BLAS threads run a large gathered GEMM (bounds scratch).
    blas_chunk: int = 8192
    #: With fewer output pixels than this per thread, threads split output channels instead.
    split_rows_min: int = 128
    #: Winograd needs this many 4x4 tiles to repay reading its 4x larger filters; layers with
    #: C * O > ``winograd_wide`` need ``winograd_min_tiles_wide`` (16: ResNet's 7x7x512
    #: layers from batch 4; at batch 8 ResNet-18 1.21x, ResNet-50 1.08x faster than 64).
    winograd_min_tiles: int = 12
    winograd_min_tiles_wide: int = 16
    winograd_wide: int = 256 * 256
    #: Below this many output elements a simple kernel runs in the calling thread only.
    parallel_min_elements: int = 1 << 15
    #: Use numres's own GEMM (``_gemm.py``) for ungrouped convolutions where the CPU has
    #: AVX2/AVX-512; otherwise (or when False) BLAS.
    own_gemm: bool = True

    def gemm_plan(self, m, k, n, threads):
        """How to run an (m, k) @ (k, n) convolution GEMM: "rows", "columns" or "blas"."""
        if threads == 1 or (m * k * n >= self.blas_min_macs and n >= self.blas_min_n):
            return "blas"
        if m < threads * self.split_rows_min:
            return "columns"
        return "rows"

    def use_winograd(self, conv, tiles, in_channels):
        if not conv.winograd_capable:
            return False
        wide = in_channels * conv.out_channels > self.winograd_wide
        return tiles >= (self.winograd_min_tiles_wide if wide else self.winograd_min_tiles)


@dataclass
class Conv:
    kind: str   # "gemm" (1x1) | "im2col" | "grouped" | "grouped_direct" | "grouped_small"
    weight: np.ndarray      # (kh*kw*C, O), (G, kh*kw*C/G, O/G) for "grouped"; None if packed
    bias: np.ndarray        # (O,)
    kernel_size: int
    stride: int
    padding: int
    groups: int
    out_channels: int
    winograd_capable: bool = False
    winograd: np.ndarray = field(default=None, repr=False)  # (36, C, O), made on first use
    packed: np.ndarray = field(default=None, repr=False)    # numres GEMM panels, if used

    def winograd_weight(self):
        # Made on first use only: at batch 1 the deep layers never have enough tiles, and
        # the transformed filters are 4x the size of the plain ones.
        if self.winograd is None:
            plain = self.weight if self.packed is None else \
                _gemm.unpack_weights(self.packed, self.out_channels)
            c, o = plain.shape[0] // 9, plain.shape[1]
            self.winograd = _winograd.transform_weights(plain.reshape(3, 3, c, o),
                                                        packed=self.packed is not None)
        return self.winograd


@dataclass
class BatchNorm:
    scale: np.ndarray
    shift: np.ndarray


@dataclass
class Linear:
    weight_t: np.ndarray    # (in, out)
    bias: np.ndarray


def kernels_cached():
    """Whether this machine already has the compiled kernels on disk (Numba's cache)."""
    try:
        return os.path.exists(_gemm.conv_pixels._cache._cache_file._index_path)
    except AttributeError:  # a Numba without this internal layout: assume compiled
        return True


_notice_lock = threading.Lock()
_noticed = False


def _compile_notice():
    global _noticed
    with _notice_lock:
        if _noticed or kernels_cached():
            return
        _noticed = True
    sys.stderr.write("numres: compiling the CPU kernels for this machine; this happens once "
                     "(20-30 s on 2 cores) and is cached. 'numres warmup' does it ahead.\n")


def warmup():
    """Compile (or load from cache) every kernel the backend uses, on tiny arrays, so that
    no later call pauses: each convolution path, Winograd, grouped convolution, unfolded
    batch norm, pooling and the layout change."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 9, 9)).astype(np.float32)
    for be in (NumbaBackend(threads=1, winograd_min_tiles=0, winograd_min_tiles_wide=0),
               NumbaBackend(threads=1, own_gemm=False)):
        act = be.from_nchw(x)
        for k, s, p, g in ((1, 1, 0, 1), (1, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1),
                           (3, 1, 1, 4)):
            conv = be.prepare_conv(rng.standard_normal((8, 8 // g, k, k)).astype(np.float32),
                                   np.zeros(8, np.float32), s, p, g)
            out = be.conv2d(act, conv, relu=True)
            be.conv2d(act, conv, relu=False, residual=out if s == 1 else None)
        wide = be.from_nchw(rng.standard_normal((1, 16, 9, 9)).astype(np.float32))
        grouped = be.prepare_conv(np.ones((16, 4, 3, 3), np.float32), None, 1, 1, 4)
        be.conv2d(wide, grouped, relu=True)     # 4 channels per group: _grouped.py
        stem = be.prepare_conv(np.zeros((8, 3, 7, 7), np.float32), None, 2, 3, 1)
        be.conv2d(be.from_nchw(x[:, :3]), stem, relu=True)
        ones = np.ones(8, np.float32)
        be.batch_norm(act, be.prepare_batch_norm(ones, ones, ones, ones, 1e-5), relu=True,
                      residual=act)
        be.max_pool2d(act, 3, 2, 1)


class NumbaBackend(Backend):
    """NHWC CPU backend. Activations are (N, H, W, C) float32 NumPy arrays.

    Args:
        threads: threads per layer (default: see module docstring).
        winograd: allow Winograd for stride-1 3x3 convolutions (``NUMRES_WINOGRAD=0`` too).
        replay: record the first pass per input shape and replay it later (``_replay.py``;
            ``NUMRES_REPLAY=0`` too).
        **tuning: overrides of :class:`Tuning` fields.
    """

    name = "numba"

    def __init__(self, threads=None, winograd=True, replay=True, **tuning):
        self.tuning = Tuning(**tuning)
        self.replay = replay and os.environ.get("NUMRES_REPLAY", "1") != "0"
        self._recording = threading.local()
        self._batch_hint = threading.local()   # as_batch(n): choices made for n images
        threads = threads or default_threads()
        if os.environ.get("NUMRES_NUM_THREADS"):
            _limit_blas_threads(threads)
        self.winograd = winograd and os.environ.get("NUMRES_WINOGRAD", "1") != "0"
        self.executor = shared(threads)
        self.workspace = Workspace()
        _compile_notice()

    # -- data movement ---------------------------------------------------------------------
    def from_nchw(self, x):
        n, c, h, w = x.shape
        out = self.workspace.get((n, h, w, c))
        self._step(self._from_nchw, x, out)
        return out

    def _from_nchw(self, x, out):
        x = np.ascontiguousarray(x, np.float32)
        self._rows(x.shape[0] * x.shape[2], out.size, K.nchw_to_nhwc, x, out)

    def to_nchw(self, act):
        n, h, w, c = act.shape
        out = self.workspace.get((n, c, h, w))
        self._step(_copy_nchw, act, out)
        return out

    def to_numpy(self, array):
        # Results may live in the workspace; hand out a copy the pool will never reuse.
        return np.array(array, copy=True)

    # -- weights ---------------------------------------------------------------------------
    def prepare_conv(self, weight, bias, stride, padding, groups):
        o, cg, k, _ = weight.shape
        bias = np.zeros(o, np.float32) if bias is None else np.asarray(bias, np.float32)
        if groups > 1 and self.tuning.own_gemm and _gemm.AVAILABLE \
                and _grouped.supports(weight.shape, groups):
            return Conv("grouped_small", None, bias, k, stride, padding, groups, o,
                        packed=_grouped.pack(np.asarray(weight, np.float32)))
        if groups > 1 and o // groups <= GROUPED_DIRECT_MAX_WIDTH and self.tuning.own_gemm \
                and _gemm.AVAILABLE:
            return Conv("grouped_direct", None, bias, k, stride, padding, groups, o,
                        packed=_gemm.pack_grouped(np.asarray(weight, np.float32), groups))
        if groups > 1:
            # (G, O/G, Cg, kh, kw) -> (G, kh, kw, Cg, O/G): rows in im2col_grouped's order
            w = weight.reshape(groups, o // groups, cg, k, k).transpose(0, 3, 4, 2, 1)
            w = np.ascontiguousarray(w.reshape(groups, k * k * cg, o // groups))
            return Conv("grouped", w, bias, k, stride, padding, groups, o)
        # (O, C, kh, kw) -> (kh, kw, C, O): rows in im2col's (ky, kx, c) order
        w = np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(k * k * cg, o))
        kind = "gemm" if k == 1 and padding == 0 else "im2col"
        winograd = (k, stride, padding) == (3, 1, 1) and self.winograd
        if self.tuning.own_gemm and _gemm.AVAILABLE:
            # Only the packed panels are kept: the plain matrix would double the memory.
            return Conv(kind, None, bias, k, stride, padding, groups, o, winograd,
                        packed=_gemm.pack_weights(w))
        return Conv(kind, w, bias, k, stride, padding, groups, o, winograd)

    def prepare_batch_norm(self, mean, var, weight, bias, eps):
        scale = weight.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
        shift = bias - mean * scale
        return BatchNorm(scale.astype(np.float32), shift.astype(np.float32))

    def prepare_linear(self, weight, bias):
        return Linear(np.ascontiguousarray(weight.T, np.float32), np.asarray(bias, np.float32))

    # -- operations ------------------------------------------------------------------------
    def conv2d(self, x, conv, relu=False, residual=None):
        n, h, w, c = x.shape
        k, s, p = conv.kernel_size, conv.stride, conv.padding
        out_h, out_w = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
        m, o = n * out_h * out_w, conv.out_channels
        y = self.workspace.get((n, out_h, out_w, o))
        epilogue = (conv.bias,
                    _EMPTY if residual is None else residual.reshape(m, o),   # (M, O) rows
                    residual is not None, relu)
        y2 = y.reshape(m, o)
        batch = getattr(self._batch_hint, "n", None) or n
        if conv.winograd_capable and self.tuning.use_winograd(
                conv, batch * -(-h // _winograd.TILE) * -(-w // _winograd.TILE), c):
            self._step(_winograd.conv3x3, x, conv.winograd_weight(), o, epilogue,
                       self.executor, y)
        elif conv.kind == "grouped":
            self._step(self._grouped, x, conv, out_h, out_w, epilogue, y2)
        elif conv.kind == "grouped_direct":
            xp = self._padded(x, conv, _gemm.MR_G)
            self._step(self._grouped_direct, xp, conv, out_h, out_w, epilogue, y2)
        elif conv.kind == "grouped_small":
            xp = self._padded(x, conv, _grouped.TILE_ROWS[conv.out_channels // conv.groups])
            self._step(self._grouped_small, xp, conv, out_h, out_w, epilogue, y2)
        elif conv.packed is not None and _reads_directly(conv, c, out_w):
            if conv.padding == 0 and out_w % _gemm.MR == 0:
                xp = x      # a strided 1x1: every tile reads inside the image, no copy needed
            else:
                xp = self._padded(x, conv, _gemm.MR)
            self._step(self._direct, xp, conv, out_h, out_w, epilogue, y2)
        elif conv.packed is not None:
            self._step(self._own_gemm, x, conv, out_h, out_w, epilogue, y2)
        else:
            self._step(self._blas_gemm, x, conv, out_h, out_w, epilogue, y2)
        return y

    def _own_gemm(self, x, conv, out_h, out_w, epilogue, y2):
        """numres's GEMM: threads claim blocks of pixels to gather, multiply and finish; with
        few pixels (deep layers, small batches) they claim output panels instead."""
        m, k_dim = y2.shape[0], conv.packed.shape[1]
        panels = conv.packed.shape[0]
        direct = conv.kind == "gemm" and conv.stride == 1
        ex = self.executor
        by_panels = m < ex.threads * self.tuning.split_rows_min and panels >= ex.threads
        if by_panels:
            # All pixels in one block: each panel's weights are read once (at batch 1 they
            # come from memory; 196 pixels in two blocks read them twice).
            mc = -(-m // _gemm.MR) * _gemm.MR
        else:
            # Blocks of up to MC pixels, at least BLOCKS_PER_THREAD per thread.
            mc = min(_gemm.MC, max(1, -(-m // (ex.threads * BLOCKS_PER_THREAD * _gemm.MR)))
                     * _gemm.MR)
        counters = _gemm.work_counters(ex.threads)

        def work(part, parts):
            a = thread_scratch("gemm_a", (mc, k_dim))
            c = thread_scratch("gemm_c", (mc, panels * _gemm.NR))
            _gemm.conv_pixels(counters, part, parts, by_panels, mc, 0, m, 0, panels, x,
                              conv.kernel_size, conv.stride, conv.padding, out_h, out_w,
                              direct, conv.packed, conv.out_channels, *epilogue, y2, a, c)
        ex.share(work)

    def _direct(self, xp, conv, out_h, out_w, epilogue, y2):
        """No im2col: the microkernel reads the padded input ``xp`` (``_gemm.conv_direct``);
        threads claim blocks of output rows of up to ``DIRECT_BLOCK_TILES`` tiles."""
        n = xp.shape[0]
        k, s = conv.kernel_size, conv.stride
        panels = conv.packed.shape[0]
        tiles = -(-out_w // _gemm.MR)
        rows = n * out_h
        threads = self.executor.threads
        # Few tiles and more weights than fit in L2 (the deep layers at small batches):
        # threads take panels for all rows, so the weights are read once, not per block.
        by_panels = (rows * tiles < 2 * threads * DIRECT_BLOCK_TILES
                     and conv.packed.nbytes > DIRECT_PANEL_BYTES and panels >= 2 * threads)
        if by_panels:
            rb = rows
        else:
            rb = max(1, min(DIRECT_BLOCK_TILES // tiles, rows // (threads * BLOCKS_PER_THREAD)))
        counters = _gemm.work_counters(threads)

        def work(part, parts):
            scratch = thread_scratch("gemm_c", (rb * tiles * _gemm.MR, panels * _gemm.NR))
            _gemm.conv_direct(counters, part, parts, by_panels, rows, rb, xp, k, s, out_h,
                              out_w, conv.packed, conv.out_channels, *epilogue, y2, scratch)
        self.executor.share(work)

    def _padded(self, x, conv, tile_rows):
        """``x`` zero-padded for a direct kernel with tiles of ``tile_rows`` pixels
        (``_gemm.padded_rows``)."""
        n, h, w, c = x.shape
        hp, wp = _gemm.padded_rows(h, w, conv.kernel_size, conv.stride, conv.padding,
                                   tile_rows)
        xp = self.workspace.get((n, hp, wp, c))
        self._step(self._rows, n * hp, xp.size, _gemm.pad_input, x, conv.padding, xp)
        return xp

    def _grouped_direct(self, xp, conv, out_h, out_w, epilogue, y2):
        """Grouped convolution with few outputs per group (ResNeXt's early stages): per
        group, a direct convolution on the padded input (``_gemm.grouped_direct``)."""
        width = -(-out_w // _gemm.MR_G) * _gemm.MR_G

        def work(r0, r1):
            scratch = thread_scratch("grouped_c", (width, _gemm.NR_G))
            _gemm.grouped_direct(r0, r1, xp, conv.kernel_size, conv.stride, out_h, out_w,
                                 conv.groups, conv.packed, conv.out_channels, *epilogue, y2,
                                 scratch)
        self.executor.run(xp.shape[0] * out_h, work)

    def _grouped_small(self, xp, conv, out_h, out_w, epilogue, y2):
        """Grouped convolution with 1-8 channels per group: whole groups per vector
        (``_grouped.py``), on the padded input ``xp``; threads split the output rows."""
        w = conv.out_channels // conv.groups

        def work(r0, r1):
            _grouped.grouped_small(r0, r1, xp, conv.kernel_size, conv.stride, out_h, out_w, w,
                                   _grouped.TILE_ROWS[w], conv.packed, conv.out_channels,
                                   *epilogue, y2)
        self.executor.run(xp.shape[0] * out_h, work)

    def _blas_gemm(self, x, conv, out_h, out_w, epilogue, y2):
        """BLAS fallback (CPUs without AVX2/AVX-512, or ``own_gemm=False``): gather (if
        needed) + GEMM + epilogue, split as :meth:`Tuning.gemm_plan` says."""
        n, _, _, c = x.shape
        o = conv.out_channels
        gather = conv.kind == "im2col" or conv.stride > 1
        rows, m = n * out_h, n * out_h * out_w
        ex = self.executor

        def block(b0, b1):
            """Output rows [b0, b1): gather, GEMM, epilogue, all while the block is hot."""
            m0, m1 = b0 * out_w, b1 * out_w
            a = (self._gathered(x, conv, b0, b1, out_w) if gather
                 else x.reshape(m, c)[m0:m1])                  # (rows of block, K)
            np.matmul(a, conv.weight, out=y2[m0:m1])
            K.bias_act(m0, m1, 0, o, y2, *epilogue)

        plan = self.tuning.gemm_plan(m, conv.weight.shape[0], o, ex.threads)
        if plan == "columns":
            a = self._gathered(x, conv, 0, rows, out_w) if gather else x.reshape(m, c)

            def columns(c0, c1):
                np.matmul(a, conv.weight[:, c0:c1], out=y2[:, c0:c1])
                K.bias_act(0, m, c0, c1, y2, *epilogue)
            ex.run(o, columns)
        elif plan == "rows":
            per_block = max(1, self.tuning.row_block // out_w)

            def blocks(r0, r1):
                for b0 in range(r0, r1, per_block):
                    block(b0, min(b0 + per_block, r1))
            ex.run(rows, blocks)
        else:
            # One large GEMM at a time with BLAS's own threads; gather and epilogue split
            # across ours. Chunks bound the im2col scratch at large batches.
            per_chunk = max(1, self.tuning.blas_chunk // out_w)
            for b0 in range(0, rows, per_chunk):
                b1 = min(b0 + per_chunk, rows)
                m0, m1 = b0 * out_w, b1 * out_w
                if gather:
                    a = self.workspace.get(((b1 - b0) * out_w, conv.weight.shape[0]))
                    ex.run(b1 - b0, lambda r0, r1: self._gather_into(
                        x, conv, b0 + r0, b0 + r1, out_w, a[r0 * out_w:r1 * out_w]))
                else:
                    a = x.reshape(m, c)[m0:m1]
                np.matmul(a, conv.weight, out=y2[m0:m1])
                ex.run(m1 - m0, lambda r0, r1: K.bias_act(m0 + r0, m0 + r1, 0, o, y2,
                                                          *epilogue))

    def _gathered(self, x, conv, r0, r1, out_w):
        """The GEMM input for output rows [r0, r1): im2col windows or a strided subsample."""
        a = self.workspace.get(((r1 - r0) * out_w, conv.weight.shape[0]))
        self._gather_into(x, conv, r0, r1, out_w, a)
        return a

    @staticmethod
    def _gather_into(x, conv, r0, r1, out_w, a):
        out_h = conv_output_size(x.shape[1], conv.kernel_size, conv.stride, conv.padding)
        _gemm.gather(x, conv.kernel_size, conv.stride, conv.padding, out_h, out_w,
                     r0 * out_w, r1 * out_w, a)

    def _grouped(self, x, conv, out_h, out_w, epilogue, y2):
        """Grouped convolution: per block, im2col into (G, rows, K) and G GEMMs."""
        n, _, _, c = x.shape
        g, k = conv.groups, conv.kernel_size
        per_block = max(1, self.tuning.row_block // out_w)

        def blocks(r0, r1):
            for b0 in range(r0, r1, per_block):
                b1 = min(b0 + per_block, r1)
                mb = (b1 - b0) * out_w
                cols = self.workspace.get((g, mb, k * k * (c // g)))
                yg = self.workspace.get((g, mb, conv.out_channels // g))
                K.im2col_grouped(b0, b1, x, k, conv.stride, conv.padding, out_w, g, cols)
                np.matmul(cols, conv.weight, out=yg)       # (G, mb, O/G)
                K.bias_act_grouped(b0 * out_w, b1 * out_w, yg, *epilogue, y2)
        self.executor.run(n * out_h, blocks)

    def _rows(self, rows, work, kernel, *args):
        """Run a row-range kernel, split across threads when there is enough work."""
        if work < self.tuning.parallel_min_elements:
            kernel(0, rows, *args)
        else:
            self.executor.run(rows, lambda r0, r1: kernel(r0, r1, *args))

    def batch_norm(self, x, bn, relu=False, residual=None):
        n, h, w, c = x.shape
        m = n * h * w
        out = self.workspace.get(x.shape)
        res = _EMPTY if residual is None else residual.reshape(m, c)
        self._step(self._rows, m, out.size, K.batch_norm, x.reshape(m, c), bn.scale, bn.shift,
                   res, residual is not None, relu, out.reshape(m, c))
        return out

    def max_pool2d(self, x, kernel_size, stride, padding):
        n, h, w, c = x.shape
        out_h = conv_output_size(h, kernel_size, stride, padding)
        out_w = conv_output_size(w, kernel_size, stride, padding)
        out = self.workspace.get((n, out_h, out_w, c))
        self._step(self._rows, n * out_h, out.size, K.max_pool, x, kernel_size, stride, padding,
                   out)
        return out

    def conv2d_max_pool(self, x, conv, relu, kernel_size, stride, padding):
        """The convolution fused with its max pool (``_gemm.conv_direct_pooled``) where it
        runs as a direct convolution (the stem); otherwise the two ops in turn."""
        n, h, w, c = x.shape
        k, s, p = conv.kernel_size, conv.stride, conv.padding
        out_h, out_w = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
        if conv.packed is None or not _reads_directly(conv, c, out_w):
            return super().conv2d_max_pool(x, conv, relu, kernel_size, stride, padding)
        pool_h = conv_output_size(out_h, kernel_size, stride, padding)
        pool_w = conv_output_size(out_w, kernel_size, stride, padding)
        out = self.workspace.get((n, pool_h, pool_w, conv.out_channels))
        xp = self._padded(x, conv, _gemm.MR)
        self._step(self._direct_pooled, xp, conv, out_h, out_w, relu, kernel_size, stride,
                   padding, out)
        return out

    def _direct_pooled(self, xp, conv, out_h, out_w, relu, kernel_size, stride, padding, out):
        threads = self.executor.threads
        rows = out.shape[0] * out.shape[1]
        # Pooled rows per block: 8 (17 convolution rows, 1 of them shared with the next
        # block), fewer where each thread would otherwise get fewer than two blocks.
        qb = max(1, min(STEM_POOL_ROWS, rows // (2 * threads)))
        band_rows = min(out_h, (qb - 1) * stride + kernel_size)
        tiles = -(-out_w // _gemm.MR)
        panels = conv.packed.shape[0]
        counters = _gemm.work_counters(threads)

        def work(part, parts):
            band = thread_scratch("stem_band", (band_rows, out_w, conv.out_channels))
            c = thread_scratch("gemm_c", (band_rows * tiles * _gemm.MR, panels * _gemm.NR))
            _gemm.conv_direct_pooled(counters, part, parts, qb, xp, conv.kernel_size,
                                     conv.stride, out_h, out_w, conv.packed, conv.out_channels,
                                     conv.bias, relu, kernel_size, stride, padding, band, c,
                                     out)
        self.executor.share(work)

    def global_avg_pool(self, x):
        n, h, w, c = x.shape
        out = self.workspace.get((n, c))
        self._step(K.mean_pixels, 0, n, x.reshape(n, h * w, c), out)   # (N, H*W, C) -> (N, C)
        return out

    def linear(self, x, fc):
        out = self.workspace.get((x.shape[0], fc.weight_t.shape[1]))
        self._step(_linear, x, fc.weight_t, fc.bias, out)
        return out

    # -- memory ----------------------------------------------------------------------------
    allocator = "pool"

    @property
    def keeps_buffers_per_shape(self):
        return self.replay

    @contextlib.contextmanager
    def as_batch(self, n):
        """Winograd's choice depends on the batch's tile count: made here as for ``n``
        images (in this thread), so chunks of a batch compute what the batch would."""
        previous = getattr(self._batch_hint, "n", None)
        self._batch_hint.n = n
        try:
            yield
        finally:
            self._batch_hint.n = previous

    def reusable_buffers(self, cache, key):
        plan = cache.get(key) if self.replay else None
        if isinstance(plan, _replay.Plan) and not plan.lock.locked():
            return None
        return workspace_free_sizes(self.workspace)

    def memory_events(self, op):
        """The workspace buffers, thread scratch and lazily made Winograd filters of each
        op, following :meth:`conv2d` and friends path by path."""
        threads = self.executor.threads
        if op.kind == "input":
            n, c, h, w = op.x
            return [("alloc", "out", nbytes((n, h, w, c)))]
        if op.kind == "conv":
            return self._conv_events(op, threads)
        if op.kind == "conv_pool":
            return self._stem_events(op, threads)
        if op.kind == "output":
            # A recorded or replayed pass copies its results (copy_tree), to_numpy again.
            copies = 2 if self.replay else 1
            return [("heap", f"result{i}.{j}", nbytes(shape))
                    for i, shape in enumerate(op.results) for j in range(copies)]
        return [("alloc", "out", nbytes(op.y))]

    def _conv_events(self, op, threads):
        conv = op.conv
        n, c, h, w = op.x
        _, o, oh, ow = op.y
        k, p, g = conv.kernel_size, conv.padding, conv.groups
        events = [("alloc", "out", nbytes((n, oh, ow, o)))]
        tiles = (op.batch or n) * -(-h // _winograd.TILE) * -(-w // _winograd.TILE)
        if conv.winograd_capable and self.tuning.use_winograd(conv, tiles, c):
            return events + self._winograd_events(conv, n, c, h, w, o, threads)
        if conv.kind == "grouped":
            # per block, in each thread's own pool: im2col (G, mb, K/G) and (G, mb, O/G);
            # a block's buffers are asked for while the previous block's are still bound
            mb = max(1, self.tuning.row_block // ow) * ow
            return events + [
                ("scratch", "grouped_cols", 2 * threads * nbytes((g, mb, k * k * (c // g)))),
                ("scratch", "grouped_y", 2 * threads * nbytes((g, mb, o // g)))]
        if conv.kind == "grouped_direct":
            width = -(-ow // _gemm.MR_G) * _gemm.MR_G
            return events + self._padded_events(op, _gemm.MR_G) + [
                ("scratch", "grouped_c", threads * nbytes((width, _gemm.NR_G))),
                ("free", "padded")]
        if conv.kind == "grouped_small":
            return events + self._padded_events(op, _grouped.TILE_ROWS[o // g]) \
                + [("free", "padded")]
        if conv.packed is not None and _reads_directly(conv, c, ow):
            panels = conv.packed.shape[0]
            tiles_w = -(-ow // _gemm.MR)
            rows = n * oh
            by_panels = (rows * tiles_w < 2 * threads * DIRECT_BLOCK_TILES
                         and conv.packed.nbytes > DIRECT_PANEL_BYTES and panels >= 2 * threads)
            rb = rows if by_panels else max(1, min(DIRECT_BLOCK_TILES // tiles_w,
                                                   rows // (threads * BLOCKS_PER_THREAD)))
            padded = [] if p == 0 and ow % _gemm.MR == 0 else self._padded_events(op, _gemm.MR)
            return events + padded + [
                ("scratch", "gemm_c",
                 threads * nbytes((rb * tiles_w * _gemm.MR, panels * _gemm.NR)))] \
                + [("free", "padded")] * bool(padded)
        m = n * oh * ow
        if conv.packed is not None:
            panels, k_dim = conv.packed.shape[:2]
            if m < threads * self.tuning.split_rows_min and panels >= threads:
                mc = -(-m // _gemm.MR) * _gemm.MR
            else:
                mc = min(_gemm.MC, max(1, -(-m // (threads * BLOCKS_PER_THREAD * _gemm.MR)))
                         * _gemm.MR)
            return events + [("scratch", "gemm_a", threads * nbytes((mc, k_dim))),
                             ("scratch", "gemm_c", threads * nbytes((mc, panels * _gemm.NR)))]
        return events + self._blas_events(conv, n, oh, ow, o, threads)

    def _winograd_events(self, conv, n, c, h, w, o, threads):
        th, tw = _winograd.tiles(h, w)
        total = n * th
        rows_per_block = max(1, _winograd.BLOCK_TILES // tw)
        alpha2 = _winograd.ALPHA ** 2
        packed = conv.packed is not None
        panels = -(-o // _gemm.NR)
        weight_bytes = nbytes((alpha2, panels, c, _gemm.NR) if packed else (alpha2, c, o))
        events = []
        if conv.winograd is None:
            # made on first use and kept; meanwhile the unpacked (9C, O) filters, one (C, O)
            # float64 product at a time and its float32 copy
            events += [("heap", "winograd_weights", weight_bytes),
                       ("heap", "transform", c * o * (48 if packed else 8)),
                       ("free", "transform")]
        if packed:
            per_block = min(rows_per_block, -(-total // threads))
            if weight_bytes <= _winograd.SMALL_FILTERS:
                per_block = min(per_block, max(-(-_winograd.MIN_BLOCK_TILES // tw),
                                               total // (3 * threads)))
            rows = -(-(per_block * tw) // _gemm.MR) * _gemm.MR
            width = panels * _gemm.NR
        else:
            rows, width = rows_per_block * tw, o
        scratch = {"winograd_d": alpha2 * c, "winograd_d2": alpha2 * c,
                   "winograd_v": alpha2 * rows * c, "winograd_m": alpha2 * rows * width,
                   "winograd_t": 4 * _winograd.ALPHA * o, "winograd_o": 4 * o}
        return events + [("scratch", slot, threads * size * 4) for slot, size in scratch.items()]

    def _blas_events(self, conv, n, oh, ow, o, threads):
        """The BLAS fallback's gathered GEMM inputs (``_blas_gemm``)."""
        m, k_dim = n * oh * ow, conv.weight.shape[0]
        if not (conv.kind == "im2col" or conv.stride > 1):
            return []
        plan = self.tuning.gemm_plan(m, k_dim, o, threads)
        if plan == "columns":
            return [("alloc", "gathered", nbytes((m, k_dim))), ("free", "gathered")]
        if plan == "rows":
            per_block = max(1, self.tuning.row_block // ow)
            return [("scratch", "blas_rows", threads * nbytes((per_block * ow, k_dim)))]
        rows = min(m, max(1, self.tuning.blas_chunk // ow) * ow)
        # the next chunk's buffer is asked for while the previous one is still bound
        return [("alloc", "chunk0", nbytes((rows, k_dim))), ("alloc", "chunk1",
                nbytes((rows, k_dim))), ("free", "chunk0"), ("free", "chunk1")]

    def _padded_events(self, op, tile_rows):
        n, c, h, w = op.x
        conv = op.conv
        hp, wp = _gemm.padded_rows(h, w, conv.kernel_size, conv.stride, conv.padding,
                                   tile_rows)
        return [("alloc", "padded", nbytes((n, hp, wp, c)))]

    def _stem_events(self, op, threads):
        conv = op.conv
        n, c, h, w = op.x
        _, o, oh, ow = op.conv_shape()
        if conv.packed is None or not _reads_directly(conv, c, ow):
            return compose_conv_pool(self, op)
        pool_k, pool_s, _ = op.pool
        rows = n * op.y[2]
        qb = max(1, min(STEM_POOL_ROWS, rows // (2 * threads)))
        band_rows = min(oh, (qb - 1) * pool_s + pool_k)
        panels = conv.packed.shape[0]
        tiles_w = -(-ow // _gemm.MR)
        return ([("alloc", "out", nbytes(op.y[:1] + op.y[2:] + op.y[1:2]))]
                + self._padded_events(op, _gemm.MR)
                + [("scratch", "stem_band", threads * nbytes((band_rows, ow, o))),
                   ("scratch", "gemm_c",
                    threads * nbytes((band_rows * tiles_w * _gemm.MR, panels * _gemm.NR))),
                   ("free", "padded")])

    # -- recorded passes -------------------------------------------------------------------
    def execute(self, cache, key, fn, x):
        """Run a forward pass ``fn(x)``: the first for an input shape is recorded, later ones
        replay it (``_replay.py``). At most ``MAX_PLANS`` shapes per model are kept; a plan
        in use by another thread, or a pass that could not be recorded, runs as usual."""
        with self.executor.single_threaded_blas():
            if not self.replay:
                return fn(x)
            plan = cache.get(key)
            if plan is None:
                if len(cache) >= MAX_PLANS or getattr(self._recording, "now", None) is not None:
                    return fn(x)
                return self._record(cache, key, fn, x)
            if plan == "eager" or not plan.lock.acquire(blocking=False):
                return fn(x)
            try:
                return plan.replay(x)
            finally:
                plan.lock.release()

    def _record(self, cache, key, fn, x):
        recorder = _replay.Recorder(x, self.workspace.owner_ids)
        self._recording.now = recorder
        try:
            out = fn(x)
            noted = _replay.portable_output(recorder, out)
        finally:
            self._recording.now = None
        try:
            plan = _replay.Plan(recorder, noted)
        except _replay.NotReplayable:
            plan = "eager"
        cache[key] = plan
        # The plan now owns these buffers: a copy, so a replay cannot overwrite a result
        # before the caller has it.
        return _replay.copy_tree(out)

    def _step(self, fn, *args):
        """Run ``fn(*args)``, one step of a pass, noting it when a pass is being recorded."""
        recorder = getattr(self._recording, "now", None)
        if recorder is None or recorder.inside:
            fn(*args)
            return
        recorder.add(fn, args)
        recorder.inside = True
        try:
            fn(*args)
        finally:
            recorder.inside = False


# Convolutions with fewer input channels than this (the 7x7 stem: 3) skip im2col: with so
# few channels per pixel, gathering costs more than the multiply (stem 1.5x faster direct).
DIRECT_MAX_CHANNELS = 16
# Pooled rows per block of the stem fused with its max pool (``_direct_pooled``).
STEM_POOL_ROWS = 8
# Row blocks of the direct convolution: tiles that share one panel of weights from cache.
DIRECT_BLOCK_TILES = 12
# Direct convolutions with fewer tiles than two blocks per thread and more weight bytes
# than this split by panels (ResNet-50's 28x28x256 -> 14x14 at batch 1: 2.4 MB per block).
DIRECT_PANEL_BYTES = 1 << 20
# Blocks each thread's share of a layer is cut into at least (where it has enough rows),
# so that a faster thread can take over the slower one's last blocks (``_gemm.next_block``).
BLOCKS_PER_THREAD = 4


def _reads_directly(conv, channels, out_w):
    """Whether a convolution runs as ``_gemm.conv_direct`` rather than gather + GEMM: the
    stem (few channels), and kxk or strided 1x1 convolutions whose output rows are whole
    tiles (ResNet's 112/56/28/14-wide maps), where no tile row is wasted and skipping the
    gather pays (stride-2 3x3 layers 1.06-1.24x, stride-1 3x3 without Winograd 1.3-1.5x).
    """
    if conv.kind == "im2col" and channels < DIRECT_MAX_CHANNELS:
        return True
    return (conv.kind == "im2col" or conv.stride > 1) and out_w % _gemm.MR == 0


# Grouped convolutions with at most this many outputs per group (and too many for
# ``_grouped.py``) run as direct per-group convolutions on numres's GEMM kernel: 14x14x512
# with 16 per group 3x faster than per-group BLAS GEMMs, 14x14x1024 with 32 2.4x; with 64
# (ResNeXt-101 32x8d's last stage) BLAS is faster.
GROUPED_DIRECT_MAX_WIDTH = 32

# Input shapes per model whose passes are recorded (each keeps its buffers).
MAX_PLANS = 2


def _copy_nchw(act, out):
    np.copyto(out, act.transpose(0, 3, 1, 2))      # (N, H, W, C) -> (N, C, H, W)


def _linear(x, weight_t, bias, out):
    np.matmul(x, weight_t, out=out)
    out += bias


# A residual placeholder Numba can type when a layer has none.
_EMPTY = np.zeros((1, 1), np.float32)


def _limit_blas_threads(n):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(n, user_api="blas")
