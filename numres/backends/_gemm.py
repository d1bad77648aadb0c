"""numres's own SGEMM for convolutions: a register-tiled FMA microkernel, weights packed once.

Why not BLAS for everything: a convolution's weights never change, yet BLAS repacks them on
every call, and at batch 1 the matrices are small enough that packing, the separate im2col
pass and the separate epilogue pass cost as much as the multiply. Here the weights are
packed at load time into NR-wide column panels; each thread takes a range of output rows
(pixels), gathers a block of them (im2col/subsample/none) straight into the MR-row panels
the microkernel reads, multiplies, and applies bias + residual + ReLU while the block is
still in cache.

The microkernel computes an MR x NR tile of C = A @ B in vector registers: per step of k it
loads NR/VL vectors of B, broadcasts MR values of A, and issues MR * NR/VL fused
multiply-adds. A is read where it lies (row-major, any leading dimension), so a 1x1
convolution reads the activation itself and packs nothing. It is written in LLVM IR (a Numba
intrinsic), since Numba has no vector types; LLVM turns the <VL x float> operations into
AVX-512 or AVX2 instructions. Tile shapes
per instruction set: AVX-512 14 x 32 (28 accumulators, 2 weight vectors and a broadcast: 31 of
32 registers; 14 rows divide ResNet's 112, 56, 28, 14 and 7 pixel rows, so little of a tile is
wasted: 49 pixels take 56 rows, not 60 as with 12, 1.15x faster there), AVX2 6 x 16 (12 of
16). Without AVX2+FMA this module reports itself unavailable and BLAS is used instead.
"""

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._numba_kernels import epilogue_block, pool_row
from ._workspace import aligned_empty


def _vector_config():
    """(VL, MR) for the host CPU, or None when it has neither AVX-512 nor AVX2 with FMA."""
    try:
        features = llvm_binding.get_host_cpu_features()
    except RuntimeError:
        return None
    if features.get("avx512f"):
        return 16, 14
    if features.get("avx2") and features.get("fma"):
        return 8, 6
    return None


_CONFIG = _vector_config()
AVAILABLE = _CONFIG is not None
VL, MR = _CONFIG or (8, 6)
NR = 2 * VL
# Depth of one packed A panel: with MR = 14 that is 14 KiB of A and 32 KiB of B per
# microkernel call, both inside a 48 KiB L1 data cache.
KC = 256
# Output pixels per block a thread gathers, multiplies and finishes at once (a multiple of MR).
MC = 12 * MR

_JIT = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False)


@intrinsic
def _data_ptr(typingctx, arr):
    """The float32 data pointer of an array."""
    sig = types.CPointer(types.float32)(arr)

    def codegen(context, builder, signature, args):
        return context.make_array(signature.args[0])(context, builder, args[0]).data
    return sig, codegen


@intrinsic
def _claim(typingctx, counters, slot):
    """Atomically ``counters[slot] += 1``; returns the value before (int64 array)."""
    sig = types.int64(counters, types.intp)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        where = builder.gep(array.data, [args[1]])
        return builder.atomic_rmw("add", where, ir.Constant(ir.IntType(64), 1), "monotonic")
    return sig, codegen


# Claim counters one 64-byte line apart, so threads claiming work do not share a line.
COUNTER_STRIDE = 8


def work_counters(parts):
    """Fresh counters for :func:`next_block`, shared by the ``parts`` threads of one run."""
    return np.zeros(parts * COUNTER_STRIDE, np.int64)


@njit(inline="always", cache=True, nogil=True, error_model="numpy", boundscheck=False)
def next_block(counters, part, parts, blocks):
    """The next of ``blocks`` blocks for thread ``part`` of ``parts``, or -1 when none is
    left: first its own contiguous share, in order (the rows it had in the previous layer,
    still in its cache), then whatever the other threads have not started yet.

    Equal static shares made every layer wait for the slower thread, and the two virtual
    CPUs here are often not equally fast: one ran a compute-bound kernel 1.65x slower than
    the other (measured with each pinned in turn), for minutes at a time.
    """
    for i in range(parts):
        p = (part + i) % parts
        lo, hi = blocks * p // parts, blocks * (p + 1) // parts
        if lo >= hi:
            continue
        b = lo + _claim(counters, p * COUNTER_STRIDE)
        if b < hi:
            return b
    return -1


def register_loop(builder, vec, kc, rounds, count, start_run, step):
    """Emit ``for r < rounds: for p < kc:`` with ``count`` vector accumulators held in
    registers (phi nodes) across both loops, starting from zero; the kernels' shared skeleton.

    ``start_run(r)`` runs once per outer iteration (in its block) and returns what ``step``
    needs; ``step(run, r, p, acc)`` emits one inner iteration and returns the new
    accumulators. Returns the final accumulators, in the block after the loops (zero when
    ``kc`` or ``rounds`` is not positive), where the builder is left.
    """
    i64 = ir.IntType(64)
    zero = ir.Constant(vec, None)

    def const(v):
        return ir.Constant(i64, v)
    entry = builder.basic_block
    outer = builder.append_basic_block("loop.outer")
    inner = builder.append_basic_block("loop.inner")
    latch = builder.append_basic_block("loop.latch")
    done = builder.append_basic_block("loop.done")
    work = builder.and_(builder.icmp_signed(">", kc, const(0)),
                        builder.icmp_signed(">", rounds, const(0)))
    builder.cbranch(work, outer, done)

    builder.position_at_end(outer)
    r = builder.phi(i64)
    acc_outer = [builder.phi(vec) for _ in range(count)]
    run = start_run(r)
    outer_end = builder.basic_block
    builder.branch(inner)

    builder.position_at_end(inner)
    p = builder.phi(i64)
    acc = [builder.phi(vec) for _ in range(count)]
    new = step(run, r, p, acc)
    p_next = builder.add(p, const(1))
    inner_end = builder.basic_block
    builder.cbranch(builder.icmp_signed("<", p_next, kc), inner, latch)
    p.add_incoming(const(0), outer_end)
    p.add_incoming(p_next, inner_end)
    for phi, start, value in zip(acc, acc_outer, new):
        phi.add_incoming(start, outer_end)
        phi.add_incoming(value, inner_end)

    builder.position_at_end(latch)
    r_next = builder.add(r, const(1))
    builder.cbranch(builder.icmp_signed("<", r_next, rounds), outer, done)
    r.add_incoming(const(0), entry)
    r.add_incoming(r_next, latch)
    for phi, value in zip(acc_outer, new):
        phi.add_incoming(zero, entry)
        phi.add_incoming(value, latch)

    builder.position_at_end(done)
    results = []
    for value in new:                  # every phi first: LLVM wants them on top
        result = builder.phi(vec)
        result.add_incoming(zero, entry)
        result.add_incoming(value, latch)
        results.append(result)
    return results


def _make_microkernel(vl, mr, nr):
    nv = nr // vl

    @intrinsic
    def microkernel(typingctx, kc, rounds, a, a_off, lda, a_step, b, b_off, c, c_off, ldc,
                    accumulate, final, bias, bias_off, res, res_off, ldr, has_res, relu,
                    pf_off, pf_step):
        """C[c_off + i*ldc + j] (+)= sum over r < rounds, p < kc of
        A[a_off + r*a_step + i*lda + p] * B[b_off + (r*kc + p)*NR + j].

        ``rounds`` > 1 walks A in several runs of ``kc`` (a direct convolution's kernel rows)
        while the accumulators stay in registers; a plain GEMM block is ``rounds = 1``.
        ``final``: this is the last K chunk, so finish the tile before storing it:
        ``+ bias[bias_off + j]``, ``+ res[res_off + i*ldr + j]`` if ``has_res``, ReLU if
        ``relu`` (NaN stays NaN, as in torch). C can then be the layer's output itself.
        Each k step also prefetches two cache lines at ``B[pf_off + (r*kc + p)*pf_step]``:
        the weights the caller will multiply next (:func:`_next_chunk`).
        """
        ptr = types.CPointer(types.float32)
        sig = types.void(types.intp, types.intp, ptr, types.intp, types.intp, types.intp, ptr,
                         types.intp, ptr, types.intp, types.intp, types.boolean,
                         types.boolean, ptr, types.intp, ptr, types.intp, types.intp,
                         types.boolean, types.boolean, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            (kc, rounds, a, a_off, lda, a_step, b, b_off, c, c_off, ldc, accumulate,
             final, bias, bias_off, res, res_off, ldr, has_res, relu, pf_off, pf_step) = args
            i64 = ir.IntType(64)
            vec = ir.VectorType(ir.FloatType(), vl)
            vptr = vec.as_pointer()
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{vl}f32")
            i8ptr = ir.IntType(8).as_pointer()
            prefetch = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8ptr] + [ir.IntType(32)] * 3),
                "llvm.prefetch.p0i8")

            def i32(v):
                return ir.Constant(ir.IntType(32), v)

            def const(v):
                return ir.Constant(i64, v)
            zero = ir.Constant(vec, None)
            splat = ir.Constant(ir.VectorType(ir.IntType(32), vl), [0] * vl)
            a = builder.gep(a, [a_off])
            pf = builder.gep(b, [pf_off])
            b = builder.gep(b, [b_off])
            c = builder.gep(c, [c_off])
            res_tile = builder.gep(res, [res_off])
            row_lines = -(-nr // 16)             # 64-byte lines per tile row
            tile_lines = mr * row_lines

            def start_run(r):               # one run of kc steps of A and B
                a_run = builder.gep(a, [builder.mul(r, a_step)])
                b_run = builder.gep(b, [builder.mul(builder.mul(r, kc), const(nr))])
                a_rows = [builder.gep(a_run, [builder.mul(const(i), lda)]) for i in range(mr)]
                return a_rows, b_run

            def step(run, r, p, acc):
                a_rows, b_run = run
                b_row = builder.gep(b_run, [builder.mul(p, const(nr))])
                bv = [builder.load(builder.bitcast(builder.gep(b_row, [const(vl * v)]), vptr),
                                   align=4) for v in range(nv)]
                q = builder.add(builder.mul(r, kc), p)
                pf_row = builder.gep(pf, [builder.mul(q, pf_step)])
                for line in range(2):
                    ahead = builder.bitcast(builder.gep(pf_row, [const(16 * line)]), i8ptr)
                    builder.call(prefetch, [ahead, i32(0), i32(3), i32(1)])
                # The tile's output lines (and residual lines, if it adds them), then the
                # next tile's (MR rows further, where callers go next), one per step while
                # the multiply runs: they are usually out of L2 (a layer's output, the
                # block's input), and fetching them only at the stores stalled.
                with builder.if_then(builder.icmp_signed("<", q, const(2 * tile_lines)),
                                     likely=False):
                    row = builder.udiv(q, const(row_lines))
                    offset = builder.mul(builder.urem(q, const(row_lines)), const(16))
                    out_line = builder.gep(c, [builder.add(builder.mul(row, ldc), offset)])
                    builder.call(prefetch, [builder.bitcast(out_line, i8ptr), i32(1), i32(3),
                                            i32(1)])
                    with builder.if_then(builder.and_(final, has_res)):
                        res_line = builder.gep(res_tile,
                                               [builder.add(builder.mul(row, ldr), offset)])
                        builder.call(prefetch, [builder.bitcast(res_line, i8ptr), i32(0),
                                                i32(3), i32(1)])
                new = []
                for i in range(mr):
                    s = builder.load(builder.gep(a_rows[i], [p]), align=4)
                    sv = builder.shuffle_vector(
                        builder.insert_element(ir.Constant(vec, ir.Undefined), s, i32(0)),
                        ir.Constant(vec, ir.Undefined), splat)
                    for v in range(nv):
                        new.append(builder.call(fma, [sv, bv[v], acc[i * nv + v]]))
                return new

            results = register_loop(builder, vec, kc, rounds, mr * nv, start_run, step)
            totals, places = [], []
            for i in range(mr):
                c_row = builder.gep(c, [builder.mul(const(i), ldc)])
                for v in range(nv):
                    result = results[i * nv + v]
                    where = builder.bitcast(builder.gep(c_row, [const(vl * v)]), vptr)
                    old = builder.load(where, align=4)
                    totals.append(builder.select(accumulate, builder.fadd(result, old), result))
                    places.append(where)

            def finish(with_res, with_relu):
                """Store bias (+ residual) (ReLU) applied to the tile: once per call."""
                bias_p = builder.gep(bias, [bias_off])
                res_p = builder.gep(res, [res_off])
                bias_v = [builder.load(builder.bitcast(builder.gep(bias_p, [const(vl * v)]),
                                                       vptr), align=4) for v in range(nv)]
                for i in range(mr):
                    res_row = builder.gep(res_p, [builder.mul(const(i), ldr)])
                    for v in range(nv):
                        value = builder.fadd(totals[i * nv + v], bias_v[v])
                        if with_res:
                            r_vec = builder.load(builder.bitcast(
                                builder.gep(res_row, [const(vl * v)]), vptr), align=4)
                            value = builder.fadd(value, r_vec)
                        if with_relu:
                            value = builder.select(
                                builder.fcmp_ordered("<", value, zero), zero, value)
                        builder.store(value, places[i * nv + v], align=4)

            with builder.if_else(final) as (epilogue, plain):
                with epilogue:
                    with builder.if_else(has_res) as branches:
                        for with_res, branch in zip((True, False), branches):
                            with branch:
                                with builder.if_else(relu) as (yes, no):
                                    with yes:
                                        finish(with_res, True)
                                    with no:
                                        finish(with_res, False)
                with plain:
                    for total, where in zip(totals, places):
                        builder.store(total, where, align=4)
        return sig, codegen
    return microkernel


_microkernel = _make_microkernel(VL, MR, NR)
# Few rows (a Winograd block of 16 tiles: ResNet's 14x14 maps at batch 1, 7x7 at batch 4)
# would fill 28 of 14-row tiles' rows; 8-row tiles fill 16 (AVX-512 only: AVX2's 6 fit).
MR_SHORT = 8 if MR == 14 else MR
_microkernel_short = _make_microkernel(VL, MR_SHORT, NR)
# Half-height tiles for GEMMs of 49 pixels (7x7 maps at batch 1, ResNet's deepest layers):
# 7 tiles of 7 rows instead of 4 of 14 (56 rows, 1/8 wasted). AVX2's 6-row tiles: no half.
MR_HALF = MR // 2 if MR == 14 else MR
_microkernel_half = _make_microkernel(VL, MR_HALF, NR)
# Grouped convolutions (ResNeXt: 4 to 64 output channels per group) use one-vector-wide
# panels: AVX-512 14 x 16, AVX2 12 x 8. Not taller: the tile's rows are C floats apart in
# the image, and with C = 512 or more 28 of them fell into too few L1 sets (1.35x slower).
NR_G = VL
MR_G = 14 if VL == 16 else 12
_microkernel_g = _make_microkernel(VL, MR_G, NR_G)


def pack_weights(w, out=None):
    """(K, N) weights -> (ceil(N / NR), K, NR) column panels, zero-padded to whole panels
    (into ``out`` if given)."""
    k, n = w.shape
    panels = -(-n // NR)
    packed = aligned_empty((panels, k, NR)) if out is None else out   # rows: cache lines
    whole = n // NR
    # (K, whole*NR) -> (whole, K, NR)
    packed[:whole] = w[:, :whole * NR].reshape(k, whole, NR).transpose(1, 0, 2)
    if whole < panels:
        packed[whole] = 0.0
        packed[whole, :, :n - whole * NR] = w[:, whole * NR:]
    return packed


@njit(**_JIT)
def _next_chunk(jp, pc, k, p0, p1, tiles, pf_p1):
    """Where the weights multiplied after chunk (panel ``jp``, depth ``pc``) of panels
    [p0, p1) start, and how each of the chunk's ``tiles`` calls should prefetch a share of
    them: (first float of the share for tile 0, floats per tile, floats per k step). After
    the last chunk: panel ``p1`` if ``p1 < pf_p1`` (taken next), else the first chunk again.

    At small batches a chunk of weights serves only a few row tiles, so they come from
    memory; reading them in bursts when their chunk starts left the core waiting. Spread
    over the current chunk's calls, the next chunk is in cache when it is needed (a
    49-row GEMM 1.2-1.3x faster, 196 rows 1.05-1.13x).
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


@njit(**_JIT)
def gemm_block(a, rows, bp, p0, p1, c):
    """c[:tiles*MR, p0*NR:p1*NR] = a[:tiles*MR] @ B for column panels [p0, p1) of packed B.

    ``a`` is row-major (M, K) with at least ``tiles * MR`` rows (rows past ``rows`` are
    computed but meaningless); ``c`` is row-major with a row stride of all panels * NR.
    Up to 16 rows may run as 8-row tiles where that pads less (``MR_SHORT``).
    """
    k = a.shape[1]
    ldc = c.shape[1]
    a_ptr, b_ptr, c_ptr = _data_ptr(a), _data_ptr(bp), _data_ptr(c)
    short = rows <= 2 * MR_SHORT and _padded(rows, MR_SHORT) < _padded(rows, MR)
    mr = MR_SHORT if short else MR
    tiles = (rows + mr - 1) // mr
    for pc in range(0, k, KC):
        kc = min(KC, k - pc)
        for jp in range(p0, p1):
            b_off = (jp * k + pc) * NR
            nxt, share, step = _next_chunk(jp, pc, k, p0, p1, tiles, p1)
            for t in range(tiles):
                if short:
                    _microkernel_short(kc, 1, a_ptr, t * mr * k + pc, k, 0, b_ptr, b_off,
                                       c_ptr, t * mr * ldc + jp * NR, ldc, pc > 0,
                                       False, c_ptr, 0, c_ptr, 0, 0, False, False,
                                       nxt + t * share, step)
                else:
                    _microkernel(kc, 1, a_ptr, t * mr * k + pc, k, 0, b_ptr, b_off, c_ptr,
                                 t * mr * ldc + jp * NR, ldc, pc > 0,
                                 False, c_ptr, 0, c_ptr, 0, 0, False, False,
                                 nxt + t * share, step)


@njit(**_JIT)
def _padded(rows, mr):
    return (rows + mr - 1) // mr * mr


@njit(**_JIT)
def _gemm_finish(a, rows, bp, p0, p1, pf_p1, n_out, bias, residual, has_residual, relu, y2,
                 m0, c):
    """y2[m0:m0+rows, panels p0..p1] = relu?(a[:rows] @ B + bias + residual?).

    Whole tiles (MR rows of one full NR-column panel) are finished by the microkernel and
    stored straight into ``y2``: no scratch round trip, no separate epilogue pass. Ragged
    tiles (the last rows of the block, a last panel narrower than NR) go through ``c``
    (this thread's (>= tiles*MR, panels*NR) scratch) and :func:`epilogue_block`. Where
    half-height tiles pad less (``MR_HALF``: 49 pixels, a 7x7 map at batch 1), they are used.
    The last chunk prefetches the weights of panel ``p1`` if ``p1 < pf_p1`` (the panel this
    thread likely takes next), else of the first chunk again.
    """
    k = a.shape[1]
    half = _padded(rows, MR_HALF) < _padded(rows, MR)
    mr = MR_HALF if half else MR
    tiles = (rows + mr - 1) // mr
    whole_tiles = rows // mr
    whole_panels = min(p1, n_out // NR)
    ldc = c.shape[1]
    a_ptr, b_ptr, c_ptr = _data_ptr(a), _data_ptr(bp), _data_ptr(c)
    y_ptr, bias_ptr = _data_ptr(y2), _data_ptr(bias)
    res_ptr = _data_ptr(residual) if has_residual else y_ptr
    for pc in range(0, k, KC):
        kc = min(KC, k - pc)
        last = pc + kc >= k
        for jp in range(p0, p1):
            b_off = (jp * k + pc) * NR
            nxt, share, step = _next_chunk(jp, pc, k, p0, p1, tiles, pf_p1)
            for t in range(tiles):
                if t < whole_tiles and jp < whole_panels:
                    out, ld, finish = (m0 + t * mr) * n_out + jp * NR, n_out, last
                    dst_ptr = y_ptr
                else:
                    out, ld, finish = t * mr * ldc + jp * NR, ldc, False
                    dst_ptr = c_ptr
                if half:
                    _microkernel_half(kc, 1, a_ptr, t * mr * k + pc, k, 0, b_ptr, b_off,
                                      dst_ptr, out, ld, pc > 0, finish, bias_ptr, jp * NR,
                                      res_ptr, out, ld, has_residual and finish, relu,
                                      nxt + t * share, step)
                else:
                    _microkernel(kc, 1, a_ptr, t * mr * k + pc, k, 0, b_ptr, b_off, dst_ptr,
                                 out, ld, pc > 0, finish, bias_ptr, jp * NR, res_ptr, out,
                                 ld, has_residual and finish, relu, nxt + t * share, step)
    c0, c1 = p0 * NR, min(p1 * NR, n_out)
    done = whole_tiles * mr
    if done < rows:           # the ragged last rows, every panel
        epilogue_block(y2, m0 + done, c, done, rows - done, c0, c1, bias, residual,
                       has_residual, relu)
    if whole_panels < p1:     # the narrow last panel, the whole tiles' rows
        epilogue_block(y2, m0, c, 0, done, max(c0, whole_panels * NR), c1, bias, residual,
                       has_residual, relu)


@njit(**_JIT)
def gather(x, k, stride, pad, out_h, out_w, m0, m1, a):
    """a[m - m0, (ky, kx, c)] = x[n, oy*s - p + ky, ox*s - p + kx, c] for pixels [m0, m1)
    of the output (m = (n, oy, ox)), 0 outside the image: im2col (k > 1) or the subsample of
    a strided 1x1 convolution (k == 1), row-major as the microkernel reads it."""
    _, h, w, c = x.shape
    kc = k * c
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
            d = ky * kc
            if iy < 0 or iy >= h or lo >= hi:
                dst[d:d + kc] = 0.0
                continue
            src = ((n * h + iy) * w + ix0) * c
            if c < 16:     # the 3-channel stem: element copies beat short slice copies
                for j in range(lo):
                    dst[d + j] = 0.0
                for j in range(lo, hi):
                    dst[d + j] = xf[src + j]
                for j in range(hi, kc):
                    dst[d + j] = 0.0
            else:
                dst[d:d + lo] = 0.0
                dst[d + lo:d + hi] = xf[src + lo:src + hi]
                dst[d + hi:d + kc] = 0.0


@njit(**_JIT)
def conv_pixels(counters, part, parts, by_panels, mc, m0, m1, p0, p1, x, k, stride, pad, out_h,
                out_w, direct, bp, n_out, bias, residual, has_residual, relu, y2, a, c):
    """Output pixels [m0, m1), column panels [p0, p1): gather, multiply, epilogue.

    Thread ``part`` of ``parts`` claims work with :func:`next_block`: blocks of ``mc``
    pixels (a multiple of MR), all panels each; or, ``by_panels`` (few pixels: the deep
    layers at small batches), single panels for all pixels, gathered once (``mc`` >= the
    pixels). ``direct``: the activation is the GEMM input as it lies (1x1, stride 1), so only
    a ragged end is copied. ``a`` (mc, K) and ``c`` (mc, panels*NR) are this thread's
    scratch; ``y2`` is the (M, n_out) output.
    """
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
        if direct and b0 + padded <= total:
            src = x2[b0:b0 + padded]
        else:
            src = a[:padded]
            if not (by_panels and started):          # by panels: one gather serves all
                if direct:
                    a[:rows] = x2[b0:b1]
                else:
                    gather(x, k, stride, pad, out_h, out_w, b0, b1, a)
                a[rows:padded] = 0.0
        started = True
        if by_panels:
            # Prefetch toward the end of this thread's own share of panels.
            share_end = p0 + blocks * (part + 1) // parts
            _gemm_finish(src, rows, bp, p0 + blk, p0 + blk + 1, share_end, n_out, bias,
                         residual, has_residual, relu, y2, b0, c)
        else:
            _gemm_finish(src, rows, bp, p0, p1, p1, n_out, bias, residual, has_residual,
                         relu, y2, b0, c)


@njit(**_JIT)
def batched_gemm(a, rows, bp, c):
    """c[e] = a[e] @ B[e] for each e: ``a`` (E, >= tiles*MR, K), ``bp`` (E, panels, K, NR)
    packed, ``c`` (E, >= tiles*MR, panels*NR). The 36 products of a Winograd block."""
    for e in range(a.shape[0]):
        gemm_block(a[e], rows, bp[e], 0, bp.shape[1], c[e])


def unpack_weights(packed, n):
    """Inverse of :func:`pack_weights`: (panels, K, NR) -> (K, n)."""
    panels, k, nr = packed.shape
    return packed.transpose(1, 0, 2).reshape(k, panels * nr)[:, :n]   # (K, panels*NR)


def padded_rows(h, w, k, stride, pad, tile_rows):
    """Rows and row width of the zero-padded input the direct kernels read (:func:`conv_direct`,
    :func:`grouped_direct`, ``_grouped.grouped_small``) with tiles of ``tile_rows`` output
    pixels: the width is a multiple of the stride, and extra rows let the last tile's unused
    rows read past the image without leaving the buffer."""
    wp = -(-(w + 2 * pad) // stride) * stride
    extra = -(-((tile_rows - 1) * stride + k) // wp) + 1
    return h + 2 * pad + extra, wp


@njit(**_JIT)
def pad_input(r0, r1, x, pad, xp):
    """xp[n, pad + iy, pad + ix, :] = x[n, iy, ix, :], zero elsewhere, for rows [r0, r1) of
    the padded (N, Hp, Wp, C) buffer (row index n * Hp + iy)."""
    n_img, h, w, c = x.shape
    _, hp, wp, _ = xp.shape
    src = x.reshape(n_img * h, w * c)          # (image rows, W*C): 1-D row copies vectorise
    dst = xp.reshape(n_img * hp, wp * c)
    for r in range(r0, r1):
        n, iy = r // hp, r % hp - pad
        row = dst[r]
        if iy < 0 or iy >= h:
            row[:] = 0.0
            continue
        row[:pad * c] = 0.0
        row[pad * c:(pad + w) * c] = src[n * h + iy]
        row[(pad + w) * c:] = 0.0


@njit(**_JIT)
def conv_direct(counters, part, parts, by_panels, rows, rb, xp, k, stride, out_h, out_w, bp,
                n_out, bias, residual, has_residual, relu, y2, c):
    """A convolution without im2col: the microkernel reads the (padded) NHWC input itself.

    For one kernel row ``ky``, the ``k * C`` inputs a pixel needs are contiguous in the
    padded NHWC input, and neighbouring output pixels start ``stride * C`` floats apart: so
    the microkernel reads A straight from the image with that row stride, in ``k`` runs (one
    per kernel row) without leaving its registers. Output rows [0, rows) (row = n * out_h +
    oy) in blocks of ``rb`` rows, claimed by thread ``part`` of ``parts`` with
    :func:`next_block` (:func:`_direct_block` for each). ``by_panels`` (few rows, large
    weights): threads claim single panels instead, each for all rows (``rb`` = ``rows``), so
    the weights are read once in all. ``xp`` from :func:`pad_input` (or the input itself
    where no tile reads outside it); ``c`` (rb * tiles * MR, panels * NR) is this thread's
    scratch for ragged tiles.
    """
    panels = bp.shape[0]
    blocks = panels if by_panels else (rows + rb - 1) // rb
    while True:
        blk = next_block(counters, part, parts, blocks)
        if blk < 0:
            return
        if by_panels:
            _direct_block(0, rows, blk, blk + 1, 0, xp, k, stride, out_h, out_w, bp, n_out,
                          bias, residual, has_residual, relu, y2, c)
        else:
            _direct_block(blk * rb, min(blk * rb + rb, rows), 0, panels, 0, xp, k, stride,
                          out_h, out_w, bp, n_out, bias, residual, has_residual, relu, y2, c)


@njit(**_JIT)
def _direct_block(b0, b1, p0, p1, row0, xp, k, stride, out_h, out_w, bp, n_out, bias, residual,
                  has_residual, relu, y2, c):
    """Output rows [b0, b1), panels [p0, p1) of :func:`conv_direct`, panel by panel, so one
    panel's weights serve the block's tiles from cache (the stem: 147 x 32 floats in L1 for
    a row; a 3x3 layer: a panel in L2 for a dozen tiles) while the next panel is prefetched
    (:func:`_next_chunk`'s scheme). Output row ``r`` is stored at row ``r - row0`` of ``y2``
    (and of ``residual``): a band of rows (:func:`conv_direct_pooled`) or the whole map."""
    _, hp, wp, ch = xp.shape
    panels = bp.shape[0]
    kc = k * ch
    kdim = k * kc
    lda = stride * ch
    ldc = c.shape[1]
    tiles = (out_w + MR - 1) // MR
    x_ptr, b_ptr, c_ptr = _data_ptr(xp), _data_ptr(bp), _data_ptr(c)
    y_ptr, bias_ptr = _data_ptr(y2), _data_ptr(bias)
    res_ptr = _data_ptr(residual) if has_residual else y_ptr
    whole_tiles = out_w // MR
    whole_panels = n_out // NR
    done = whole_tiles * MR
    calls = (b1 - b0) * tiles
    share = (kdim * NR + calls - 1) // calls
    pf_step = (share + kdim - 1) // kdim
    for jp in range(p0, p1):
        nxt = (jp + 1) * kdim * NR if jp + 1 < panels else 0
        for r in range(b0, b1):
            n, oy = r // out_h, r % out_h
            for t in range(tiles):
                a_off = ((n * hp + oy * stride) * wp + t * MR * stride) * ch
                pf = nxt + ((r - b0) * tiles + t) * share
                if t < whole_tiles and jp < whole_panels:
                    out = ((r - row0) * out_w + t * MR) * n_out + jp * NR
                    _microkernel(kc, k, x_ptr, a_off, lda, wp * ch, b_ptr, jp * kdim * NR,
                                 y_ptr, out, n_out, False, True, bias_ptr, jp * NR,
                                 res_ptr, out, n_out, has_residual, relu, pf, pf_step)
                else:
                    tile = ((r - b0) * tiles + t) * MR
                    _microkernel(kc, k, x_ptr, a_off, lda, wp * ch, b_ptr, jp * kdim * NR,
                                 c_ptr, tile * ldc + jp * NR, ldc, False,
                                 False, c_ptr, 0, c_ptr, 0, 0, False, False, pf, pf_step)
    c0, c1 = p0 * NR, min(p1 * NR, n_out)
    for r in range(b0, b1):
        tile = (r - b0) * tiles * MR
        m = (r - row0) * out_w
        if done < out_w:
            epilogue_block(y2, m + done, c, tile + done, out_w - done, c0, c1,
                           bias, residual, has_residual, relu)
        if whole_panels < p1:
            epilogue_block(y2, m, c, tile, done, max(c0, whole_panels * NR), c1,
                           bias, residual, has_residual, relu)


@njit(**_JIT)
def conv_direct_pooled(counters, part, parts, qb, xp, k, stride, out_h, out_w, bp, n_out, bias,
                       relu, pool_k, pool_s, pool_p, band, c, out):
    """:func:`conv_direct` (no residual) followed by max pooling (``pool_k``, ``pool_s``,
    ``pool_p``) into ``out`` (N, pooled H, pooled W, n_out): ResNet's stem. Threads claim
    blocks of ``qb`` pooled rows; each computes the convolution rows those need into its
    ``band`` (>= (qb - 1) * pool_s + pool_k rows of (out_w, n_out)) and pools them, so the
    full-size convolution output (ResNet-50, batch 32, 320 px: 210 MB) is never stored;
    rows shared by two blocks are computed twice. ``c`` as for :func:`conv_direct`.
    """
    pool_h = out.shape[1]
    total = out.shape[0] * pool_h
    panels = bp.shape[0]
    band2 = band.reshape(-1, n_out)                  # (rows * out_w, n_out)
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
            _direct_block(n * out_h + s0, n * out_h + s1, 0, panels, n * out_h + s0, xp, k,
                          stride, out_h, out_w, bp, n_out, bias, band2, False, relu, band2, c)
            for py in range(py0, py1):
                pool_row(band, s0, out_h, py, pool_k, pool_s, pool_p, out[n, py])
            q += py1 - py0


def pack_grouped(w, groups):
    """(O, Cin/G, k, k) grouped weights -> (G, panels, k*k*Cin/G, NR_G): per group, rows in
    (ky, kx, ci) order and NR_G-wide column panels, zero-padded."""
    o, w_in, k, _ = w.shape
    w_out = o // groups
    panels = -(-w_out // NR_G)
    padded = np.zeros((groups, panels * NR_G, w_in, k, k), np.float32)
    padded[:, :w_out] = w.reshape(groups, w_out, w_in, k, k)
    # (G, panel, NR_G, ci, ky, kx) -> (G, panel, ky, kx, ci, NR_G)
    blocks = padded.reshape(groups, panels, NR_G, w_in, k, k).transpose(0, 1, 4, 5, 3, 2)
    packed = aligned_empty((groups, panels, k * k * w_in, NR_G))
    packed[:] = blocks.reshape(groups, panels, k * k * w_in, NR_G)
    return packed


@njit(**_JIT)
def grouped_direct(r0, r1, xp, k, stride, out_h, out_w, groups, bp, n_out, bias, residual,
                   has_residual, relu, y2, c):
    """A grouped convolution (ResNeXt's 3x3) of output rows [r0, r1), per group a direct
    convolution like :func:`conv_direct`.

    For kernel row ``ky``, the group's ``Cin/G`` channels of one pixel are contiguous and the
    next ``kx`` is ``C`` floats further: the microkernel walks them in ``k`` runs, and the
    ``k`` kernel rows accumulate in the output tile. Panels are one vector wide (NR_G), so a
    group with fewer outputs (4 or 8 in ResNeXt's first stages) wastes lanes but still runs
    at a fraction of peak, instead of BLAS's per-call overhead on tiny matrices.
    ``bp`` from :func:`pack_grouped`; ``c`` (tiles * MR_G, NR_G) is this thread's scratch.
    """
    _, hp, wp, ch = xp.shape
    _, panels, kdim, _ = bp.shape
    w_in = ch // groups
    w_out = n_out // groups
    tiles = (out_w + MR_G - 1) // MR_G
    whole_tiles = out_w // MR_G
    x_ptr, b_ptr, c_ptr = _data_ptr(xp), _data_ptr(bp), _data_ptr(c)
    y_ptr, bias_ptr = _data_ptr(y2), _data_ptr(bias)
    res_ptr = _data_ptr(residual) if has_residual else y_ptr
    for r in range(r0, r1):
        n, oy = r // out_h, r % out_h
        for g in range(groups):
            for jp in range(panels):
                col = g * w_out + jp * NR_G
                width = min(NR_G, w_out - jp * NR_G)
                b_base = (g * panels + jp) * kdim * NR_G
                for t in range(tiles):
                    direct = t < whole_tiles and width == NR_G
                    out = (r * out_w + t * MR_G) * n_out + col
                    for ky in range(k):
                        a_off = (((n * hp + oy * stride + ky) * wp + t * MR_G * stride) * ch
                                 + g * w_in)
                        b_off = b_base + ky * k * w_in * NR_G
                        if direct:
                            _microkernel_g(w_in, k, x_ptr, a_off, stride * ch, ch, b_ptr,
                                           b_off, y_ptr, out, n_out, ky > 0, ky == k - 1,
                                           bias_ptr, col, res_ptr, out, n_out, has_residual,
                                           relu, b_off, 0)
                        else:
                            _microkernel_g(w_in, k, x_ptr, a_off, stride * ch, ch, b_ptr,
                                           b_off, c_ptr, t * MR_G * NR_G, NR_G, ky > 0,
                                           False, c_ptr, 0, c_ptr, 0, 0, False, False,
                                           b_off, 0)
                # Ragged tiles: from the scratch, with the epilogue, the valid part only.
                first = 0 if width < NR_G else whole_tiles * MR_G
                for ox in range(first, out_w):
                    m = r * out_w + ox
                    for j in range(width):
                        v = c[ox, j] + bias[col + j]
                        if has_residual:
                            v += residual[m, col + j]
                        if relu and v < 0:
                            v = np.float32(0.0)
                        y2[m, col + j] = v
