"""Paths ``GROUPED_LANES`` and ``GROUPED_DIRECT``: ResNeXt's grouped 3x3 convolutions on
numres's kernels, both reading the zero-padded input (``padding.py``).

``GROUPED_LANES`` (1-8 channels per group, ResNeXt's first stages): with w channels per
group, a group's GEMM is (pixels, k*k*w) @ (k*k*w, w), and a vector of output channels would
hold only w useful lanes. Instead each vector holds the input channels of vl/w whole groups,
as they lie in NHWC memory, and for each output channel o of a group there is one
accumulator: lane (group g, input ci) gathers x[g*w + ci] * W[g*w + o, ci] over the taps,
with plain FMAs and no shuffles. Only at the end are the w lanes of each group summed and
placed, once per pixel: ``out[g*w + o] = sum_ci acc[o][g*w + ci]``. Every lane of every FMA
is useful work. Needs ``Cin/G == Cout/G == w`` with w dividing the vector length, and C a
multiple of it (:func:`lanes_fit`).

``GROUPED_DIRECT`` (up to ``Tuning.grouped_direct_max_width`` outputs per group): per group a
direct convolution on the microkernel with one-vector-wide panels (the grouped tile of
``tile.py``); a group with fewer outputs than a vector wastes lanes but still runs at a
fraction of peak, instead of BLAS's per-call overhead on tiny matrices.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .._base import nbytes
from .._workspace import aligned_empty, thread_scratch
from . import padding, pairs
from .kernels import kernel
from .threads import next_block, work_counters
from .microkernel import (PAIRS, Finish, Out, Panel, Prefetch, Rows, data_ptr,
                          make_microkernel, multiply_add, plain, record_values, register_loop)
from .tile import TILE

VL = TILE.vl
#: Output pixels per tile of the lanes kernel, per group width (registers: ``tile.py``).
LANE_ROWS = TILE.lane_rows
MR_G, NR_G = TILE.grouped_mr, TILE.grouped_nr
MR_GH = TILE.grouped_half_mr
#: Panel width for groups whose outputs fill whole pairs of vectors (AVX-512; else NR_G).
NR_GW = TILE.grouped_wide_nr
#: Row strides (channels x stride; bf16 pairs count half) of ResNeXt's grouped layers with
#: 16-32 channels per group, compiled as constants (``make_microkernel``: with 14 rows at a
#: run-time stride, the kernel reloaded spilled row pointers every step).
GROUPED_ROW_STRIDES = (256, 512, 1024, 2048)
#: A group's weights stay in L1 while its rows are computed: no prefetching them.
_microkernel_g = make_microkernel(VL, NR_G, (MR_G, MR_GH), TILE.line, GROUPED_ROW_STRIDES,
                                  prefetch_b=False)
# (AVX2 has no wide tile: the same kernel, not a second copy to compile.)
_microkernel_gw = _microkernel_g if NR_GW == NR_G else make_microkernel(
    VL, NR_GW, (MR_G, MR_GH), TILE.line, GROUPED_ROW_STRIDES, prefetch_b=False)


# -- GROUPED_LANES ----------------------------------------------------------------------------
def make_lanes_kernel(vl, rows):
    """The lanes kernel for widths ``rows`` (w -> pixels per tile), one body per width (a
    call's ``w`` picks one).

    ``kernel(w, kc, rounds, x, tap_stride, b, y, valid, finish)``: for the first ``valid``
    of the tile's pixels i and lanes l (o = l % w), over r < rounds, p < kc:
    ``acc[i][o] += X[x.offset + r*x.step + p*tap_stride + i*x.ld + l] * B[b.offset +
    ((r*kc + p)*w + o)*vl + l]``; then ``y[y.offset + i*y.ld + l] = relu?(sum_ci
    acc[o][(l//w)*w + ci] + bias + residual?)`` with ``x`` :class:`~.microkernel.Rows`,
    ``b`` :class:`~.microkernel.Panel`, ``y`` :class:`~.microkernel.Out` and ``finish`` a
    :class:`~.microkernel.Finish` (always applied).

    With ``x`` and ``b`` pointers to bf16 pairs (``pairs.py``; even ``w``), lane l holds
    channels 2l and 2l+1 (group ``l // (w/2)``, pair ``q = l % (w/2)`` of it), each step
    adds both products (``vdpbf16ps``), and a vector of pairs covers ``2 vl`` channels: the
    tile stores two output vectors, ``y[... + H*vl + j] = relu?(sum_q acc[j % w][((H*vl +
    j) // w) * w/2 + q] + ...)`` for H = 0, 1.
    """
    @intrinsic
    def lanes(typingctx, w, kc, rounds, x, tap_stride, b, y, valid, finish):
        sig = types.void(types.intp, types.intp, types.intp, x, types.intp, b, y, types.intp,
                         finish)

        def codegen(context, builder, signature, args):
            w, kc, rounds, x, tap_stride, b, y, valid, finish = args
            x = record_values(context, builder, signature.args[3], x, "a")
            b = record_values(context, builder, signature.args[5], b, "b")
            y = record_values(context, builder, signature.args[6], y, "c")
            finish = record_values(context, builder, signature.args[8], finish, "finish")
            pairs = signature.args[3].types[0] == PAIRS
            if pairs != (signature.args[5].types[0] == PAIRS):
                raise TypeError("lanes kernel: x and b must both be float32 or both pairs")
            for width, mr in rows.items():
                if pairs and width % 2:
                    continue
                with builder.if_then(builder.icmp_signed("==", w, ir.Constant(
                        ir.IntType(64), width))):
                    _lanes_body(builder, vl, width, mr, kc, rounds, x, tap_stride, b, y, valid,
                                finish, pairs)
            return context.get_dummy_value()
        return sig, codegen
    return lanes


def _lanes_body(builder, vl, w, mr, kc, rounds, x, a_pstride, b, y, valid, finish, pairs):
    """The IR of one group width (see :func:`make_lanes_kernel`)."""
    x, a_off, lda, a_step = x
    b, b_off = b
    y, y_off, ldy, _ = y
    _, bias, bias_off, res, _, _, has_res, relu = finish
    i64 = ir.IntType(64)
    vec = ir.VectorType(ir.FloatType(), vl)
    vptr = vec.as_pointer()
    madd = multiply_add(builder, vl, pairs)     # operands loaded as float vectors: bits
    zero = ir.Constant(vec, None)

    def const(v):
        return ir.Constant(i64, v)

    def load(base, offset):
        return builder.load(builder.bitcast(builder.gep(base, [offset]), vptr), align=4)

    x = builder.gep(x, [a_off])
    b = builder.gep(b, [b_off])

    def start_run(r):               # one kernel row: kc taps
        return (builder.gep(x, [builder.mul(r, a_step)]),
                builder.gep(b, [builder.mul(builder.mul(r, kc), const(w * vl))]))

    def step(run, r, p, acc):
        x_run, b_run = run
        b_tap = builder.gep(b_run, [builder.mul(p, const(w * vl))])
        weights = [load(b_tap, const(o * vl)) for o in range(w)]
        x_tap = builder.gep(x_run, [builder.mul(p, a_pstride)])
        new = []
        for i in range(mr):
            xv = load(x_tap, builder.mul(const(i), lda))
            for o in range(w):
                new.append(madd(xv, weights[o], acc[i * w + o]))
        return new

    results = register_loop(builder, vec, kc, rounds, mr * w, start_run, step)
    lanes = ir.VectorType(ir.IntType(32), vl)
    for i in range(mr):
        acc = results[i * w:i * w + w]
        if not pairs:
            # One vector: lane (g, o) is output o of group g.
            outputs = [_group_sums(builder, vl, w, acc)]
        else:
            # A group's w/2 pair lanes sum to two vectors, lane (g, c) of vector e being
            # output 2c + e; each output vector (half H, lane j: channel H*vl + j, group
            # (H*vl + j) // w, output o = j % w) picks its lanes from the two.
            even, odd = _group_sums(builder, vl, w // 2, acc)
            outputs = []
            for half in range(2):
                mask = [(j % w) % 2 * vl + (half * vl + j) // w * (w // 2) + (j % w) // 2
                        for j in range(vl)]
                outputs.append(builder.shuffle_vector(even, odd, ir.Constant(lanes, mask)))
        for half, value in enumerate(outputs):
            bias_v = load(bias, builder.add(bias_off, const(half * vl)))
            _store_lanes_row(builder, builder.fadd(value, bias_v), i, y, y_off, ldy,
                             half * vl, vl, valid, has_res, res, relu, zero, vptr)


def _store_lanes_row(builder, value, i, y, y_off, ldy, column, vl, valid, has_res, res, relu,
                     zero, vptr):
    """Store tile row ``i``'s output vector at ``column`` (plus the residual, ReLU) if the
    row is one of the ``valid`` ones."""
    i64 = ir.IntType(64)
    out_off = builder.add(y_off, builder.add(builder.mul(ir.Constant(i64, i), ldy),
                                             ir.Constant(i64, column)))
    with builder.if_then(builder.icmp_signed(">", valid, ir.Constant(i64, i))):
        value = builder.select(has_res, builder.fadd(value, builder.load(
            builder.bitcast(builder.gep(res, [out_off]), vptr), align=4)), value)
        value = builder.select(relu, builder.select(
            builder.fcmp_ordered("<", value, zero), zero, value), value)
        builder.store(value, builder.bitcast(builder.gep(y, [out_off]), vptr), align=4)


def _group_sums(builder, vl, size, accumulators):
    """Sums over groups of ``size`` lanes (a power of two) of the ``len(accumulators)``
    vectors (a multiple of it): a tree of log2(size) levels, each halving the vectors, to
    ``len / size`` vectors where lane (g, c) of vector e holds the sum over group g's lanes
    of ``accumulators[e + c * len / size]`` (size = len = w: one vector, lane (g, o) output
    o). At the level of bit ``j``, vectors a and b become one whose lane c is
    ``x[c] + x[c ^ j]``, x = a where bit j of c is 0, else b: a blend, a two-source permute
    and an add, 3 (w - 1) operations per pixel where summing each output lane by shuffles
    took w^2 (w = 8: 21 against 64, as many as the tile's multiply-adds)."""
    vectors = list(accumulators)
    lanes = ir.VectorType(ir.IntType(32), vl)
    bit = size // 2
    while bit:
        half = len(vectors) // 2
        take_a = [(c % size) & bit == 0 for c in range(vl)]
        blend = ir.Constant(lanes, [c if a else vl + c for c, a in zip(range(vl), take_a)])
        partner = ir.Constant(lanes, [(c ^ bit) if a else vl + (c ^ bit)
                                      for c, a in zip(range(vl), take_a)])
        vectors = [builder.fadd(
            builder.shuffle_vector(vectors[o], vectors[o + half], blend),
            builder.shuffle_vector(vectors[o], vectors[o + half], partner))
            for o in range(half)]
        bit //= 2
    return vectors if len(vectors) > 1 else vectors[0]


_lanes = make_lanes_kernel(VL, LANE_ROWS)


def lanes_fit(weight_shape, groups, bf16=False):
    """Whether the lanes kernel runs a grouped convolution of these (O, Cin/G, k, k)
    weights (``bf16``: on bf16 pairs: an even width, whole vectors of pairs)."""
    o, w_in, _, _ = weight_shape
    fits = w_in in LANE_ROWS and o // groups == w_in and o % VL == 0
    return fits and (not bf16 or (w_in % 2 == 0 and o % (2 * VL) == 0))


def pack_lanes(weight):
    """(O, w, k, k) weights -> (O/VL, k, k, w, VL): for each block of VL channels (whole
    groups), tap and output index o, the vector of W[g*w + o, ci] over lanes (g, ci)."""
    o, w, k, _ = weight.shape
    lanes = np.arange(VL)
    out = aligned_empty((o // VL, k, k, w, VL))
    for blk in range(o // VL):
        for oo in range(w):
            rows = blk * VL + (lanes // w) * w + oo          # output channel per lane
            # (VL lanes, ky, kx) -> (ky, kx, VL)
            out[blk, :, :, oo, :] = weight[rows, lanes % w].transpose(1, 2, 0)
    return out


def pack_lanes_pairs(weight):
    """(O, w, k, k) weights -> (O/(2 VL), k, k, w, VL) bf16 pairs (even w): for each block
    of 2 VL channels, tap and output index o, lane l holds the pair (W[g*w + o, 2q],
    W[g*w + o, 2q + 1]) of group g = l // (w/2), q = l % (w/2)."""
    o, w, k, _ = weight.shape
    h = w // 2
    lanes = np.arange(VL)
    two = np.empty((o // (2 * VL), k, k, w, 2, VL), np.float32)   # each lane's two inputs
    for blk in range(o // (2 * VL)):
        for oo in range(w):
            rows = (blk * 2 * VL // w + lanes // h) * w + oo     # output channel per lane
            for i in range(2):
                # (VL lanes, ky, kx) -> (ky, kx, VL)
                two[blk, :, :, oo, i] = weight[rows, 2 * (lanes % h) + i].transpose(1, 2, 0)
    out = aligned_empty((o // (2 * VL), k, k, w, VL), np.uint32)
    out[:] = pairs.pack(two)[..., 0, :]             # (..., 2, VL) -> (..., 1, VL)
    return out


@kernel
def grouped_lanes(counters, part, parts, xp, k, stride, out_h, out_w, w, mr, bp, n_out, epi,
                  y2):
    """A grouped convolution with w channels per group, on the output rows (row = n * out_h
    + oy) thread ``part`` of ``parts`` claims one at a time (``threads.next_block``: a
    static half each made every layer wait for the slower of two virtual CPUs), from the
    zero-padded NHWC input ``xp``; ``bp`` from :func:`pack_lanes`; ``mr`` is
    ``LANE_ROWS[w]``; ``epi`` the :class:`~.kernels.Epilogue`. With bf16 pairs (``xp``
    and ``bp`` from :func:`pack_lanes_pairs`, uint32), a vector of pairs makes two of
    the output's."""
    bias, residual, has_residual, relu = epi
    _, hp, wp, ch = xp.shape
    per = n_out // ch                # output channels per input element: 1, or 2 (pairs)
    tiles = (out_w + mr - 1) // mr
    x_ptr, b_ptr, y_ptr, bias_ptr = data_ptr(xp), data_ptr(bp), data_ptr(y2), data_ptr(bias)
    res_ptr = data_ptr(residual) if has_residual else y_ptr
    rows = y2.shape[0] // out_w
    while True:
        r = next_block(counters, part, parts, rows)
        if r < 0:
            return
        n, oy = r // out_h, r % out_h
        for t in range(tiles):
            valid = min(mr, out_w - t * mr)
            for cb in range(ch // VL):
                a_off = ((n * hp + oy * stride) * wp + t * mr * stride) * ch + cb * VL
                y_off = (r * out_w + t * mr) * n_out + cb * VL * per
                _lanes(w, k, k, Rows(x_ptr, a_off, stride * ch, wp * ch), ch,
                       Panel(b_ptr, cb * k * k * w * VL), Out(y_ptr, y_off, n_out, False),
                       valid, Finish(True, bias_ptr, cb * VL * per, res_ptr, y_off, n_out,
                                     has_residual, relu))


def run_lanes(be, x, conv, epi, y):
    """Run a convolution on ``GROUPED_LANES`` (see ``paths.RUNNERS``)."""
    w = conv.out_channels // conv.groups
    xp = padding.padded(be, x, conv, LANE_ROWS[w])
    be.step(multiply_lanes, be.executor, xp, conv, epi, y)


def multiply_lanes(ex, xp, conv, epi, y):
    """Threads claim output rows (:func:`grouped_lanes`)."""
    n, out_h, out_w, o = y.shape
    y2 = y.reshape(n * out_h * out_w, o)          # (N*oh*ow, O): one row per pixel
    w = o // conv.groups
    counters = work_counters(ex.threads)

    def work(part, parts):
        grouped_lanes(counters, part, parts, xp, conv.kernel_size, conv.stride, out_h, out_w,
                      w, LANE_ROWS[w], conv.weight, o, epi, y2)
    ex.share(work)


def lanes_events(conv, x, y, threads, tuning):
    """The padded input."""
    return padding.events(x, conv, LANE_ROWS[y[3] // conv.groups]) + [("free", "padded")]


# -- GROUPED_DIRECT ---------------------------------------------------------------------------
def grouped_panel_width(w_out):
    """Columns of the grouped kernel's weight panels for ``w_out`` outputs per group:
    ``NR_GW`` where they fill whole wide panels (half the broadcasts per FMA), else
    ``NR_G``."""
    return NR_GW if w_out % NR_GW == 0 else NR_G


def pack_grouped(w, groups, bf16=False):
    """(O, Cin/G, k, k) grouped weights -> (G, panels, k*k*Cin/G, nr): per group, rows in
    (ky, kx, ci) order and column panels ``nr`` = :func:`grouped_panel_width` wide,
    zero-padded; with ``bf16`` (an even Cin/G), (G, panels, k*k*Cin/G / 2, nr) bf16 pairs of
    adjacent ci (``pairs.pack``)."""
    o, w_in, k, _ = w.shape
    w_out = o // groups
    nr = grouped_panel_width(w_out)
    panels = -(-w_out // nr)
    padded = np.zeros((groups, panels * nr, w_in, k, k), np.float32)
    padded[:, :w_out] = w.reshape(groups, w_out, w_in, k, k)
    # (G, panel, nr, ci, ky, kx) -> (G, panel, ky, kx, ci, nr)
    blocks = padded.reshape(groups, panels, nr, w_in, k, k).transpose(0, 1, 4, 5, 3, 2)
    rows = blocks.reshape(groups, panels, k * k * w_in, nr)
    if bf16:
        rows = pairs.pack(rows)
    packed = aligned_empty(rows.shape, rows.dtype)
    packed[:] = rows
    return packed


def grouped_tile_rows(out_w):
    """The grouped kernel's tile height for output rows ``out_w`` pixels wide: ``MR_GH``
    where it wastes fewer rows than ``MR_G`` (7x7 maps: 7 of 7 rather than 7 of 14)."""
    return MR_GH if -(-out_w // MR_GH) * MR_GH < -(-out_w // MR_G) * MR_G else MR_G


@kernel
def grouped_direct(counters, part, parts, xp, k, stride, out_h, out_w, groups, bp, n_out, epi,
                   y2, c, mr):
    """A grouped convolution, per group a direct convolution like ``direct.conv_direct``, in
    tiles of ``mr`` pixels (:func:`grouped_tile_rows`), on the (image, group) pairs thread
    ``part`` of ``parts`` claims one at a time (``threads.next_block``), each over all the
    image's output rows: a group's weights (9-36 KB) stay in L1/L2 while they are used.
    Claiming output rows read every group's weights again for every row, from L3 once a
    layer's are over 1 MB: ResNeXt's layers at batch 1 were 1.1-1.4x slower that way.

    For kernel row ``ky``, the group's ``Cin/G`` channels of one pixel are contiguous and the
    next ``kx`` is ``C`` floats further: the microkernel walks them in ``k`` runs, and the
    ``k`` kernel rows accumulate in the output tile. ``bp`` from :func:`pack_grouped` (its
    panel width picks the tile); ``c`` (tiles * MR_G, NR_GW) is this thread's scratch. With
    bf16 pairs (``xp`` and ``bp`` uint32), channels count pairs.
    """
    bias, residual, has_residual, relu = epi
    _, hp, wp, ch = xp.shape
    _, panels, kdim, nr = bp.shape
    w_in = ch // groups
    w_out = n_out // groups
    tiles = (out_w + mr - 1) // mr
    whole_tiles = out_w // mr
    x_ptr, b_ptr, c_ptr = data_ptr(xp), data_ptr(bp), data_ptr(c)
    y_ptr, bias_ptr = data_ptr(y2), data_ptr(bias)
    res_ptr = data_ptr(residual) if has_residual else y_ptr
    ldc = c.shape[1]
    images = y2.shape[0] // (out_h * out_w)
    while True:
        u = next_block(counters, part, parts, images * groups)
        if u < 0:
            return
        n, g = u // groups, u % groups
        for jp in range(panels):
            col = g * w_out + jp * nr
            width = min(nr, w_out - jp * nr)
            b_base = (g * panels + jp) * kdim * nr
            for oy in range(out_h):
                r = n * out_h + oy
                for t in range(tiles):
                    direct = t < whole_tiles and width == nr
                    out = (r * out_w + t * mr) * n_out + col
                    for ky in range(k):
                        a = Rows(x_ptr, (((n * hp + oy * stride + ky) * wp + t * mr * stride)
                                         * ch + g * w_in), stride * ch, ch)
                        b = Panel(b_ptr, b_base + ky * k * w_in * nr)
                        if direct:
                            o = Out(y_ptr, out, n_out, ky > 0)
                            f = Finish(ky == k - 1, bias_ptr, col, res_ptr, out, n_out,
                                       has_residual, relu)
                        else:
                            o = Out(c_ptr, t * mr * ldc, ldc, ky > 0)
                            f = plain(c_ptr)
                        if nr == NR_G:
                            _microkernel_g(mr, w_in, k, a, b, o, f, Prefetch(0, 0))
                        else:
                            _microkernel_gw(mr, w_in, k, a, b, o, f, Prefetch(0, 0))
                # Ragged tiles: from the scratch, with the epilogue, the valid part only.
                first = 0 if width < nr else whole_tiles * mr
                for ox in range(first, out_w):
                    m = r * out_w + ox
                    for j in range(width):
                        v = c[ox, j] + bias[col + j]
                        if has_residual:
                            v += residual[m, col + j]
                        if relu and v < 0:
                            v = np.float32(0.0)
                        y2[m, col + j] = v


def run_direct(be, x, conv, epi, y):
    """Run a convolution on ``GROUPED_DIRECT`` (see ``paths.RUNNERS``)."""
    xp = padding.padded(be, x, conv, MR_G)
    be.step(multiply_direct, be.executor, xp, conv, epi, y)


def _scratch_width(out_w):
    """Rows of a thread's ragged-tile scratch: a whole output row of tiles."""
    return -(-out_w // MR_G) * MR_G


def multiply_direct(ex, xp, conv, epi, y):
    """Threads claim output rows (:func:`grouped_direct`)."""
    n, out_h, out_w, o = y.shape
    y2 = y.reshape(n * out_h * out_w, o)          # (N*oh*ow, O): one row per pixel
    width = _scratch_width(out_w)
    counters = work_counters(ex.threads)

    def work(part, parts):
        scratch = thread_scratch("grouped_c", (width, NR_GW))
        grouped_direct(counters, part, parts, xp, conv.kernel_size, conv.stride, out_h, out_w,
                       conv.groups, conv.weight, o, epi, y2, scratch, grouped_tile_rows(out_w))
    ex.share(work)


def direct_events(conv, x, y, threads, tuning):
    """The padded input and each thread's ragged-tile scratch."""
    return padding.events(x, conv, MR_G) + [
        ("scratch", "grouped_c", threads * nbytes((_scratch_width(y[2]), NR_GW))),
        ("free", "padded")]
