"""Grouped convolutions with 1-8 channels per group (ResNeXt's first stages), vector-wide.

With w channels per group, a group's GEMM is (pixels, k*k*w) @ (k*k*w, w): a vector of
output channels would hold only w useful lanes. Instead each vector holds the input
channels of 16/w (AVX-512; 8/w with AVX2) whole groups, as they lie in NHWC memory, and
for each output channel o of a group there is one accumulator: lane (group g, input ci)
gathers x[g*w + ci] * W[g*w + o, ci] over the taps, with plain FMAs and no shuffles. Only
at the end are the w lanes of each group summed and placed, once per pixel:
``out[g*w + o] = sum_ci acc[o][g*w + ci]``. Every lane of every FMA is useful work.

Needs ``Cin/G == Cout/G == w`` with w dividing the vector length, and C a multiple of it.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._gemm import VL, _JIT, _data_ptr, register_loop
from ._workspace import aligned_empty

# Pixels per tile for each group width: accumulators (MR * w) + weights (w) + one input
# vector must fit the register file (32 vectors with AVX-512, 16 with AVX2).
TILE_ROWS = {1: 24, 2: 12, 4: 6, 8: 2} if VL == 16 else {1: 12, 2: 6, 4: 2}
WIDTHS = tuple(TILE_ROWS)


def _make_kernel(vl, w, mr):
    @intrinsic
    def kernel(typingctx, kc, rounds, x, a_off, lda, a_pstride, a_step, b, b_off, y, y_off,
               ldy, valid, bias, bias_off, res, has_res, relu):
        """y[y_off + i*ldy + l] = relu?(sum_ci acc[o][(l//w)*w + ci] + bias (+ res)) for the
        first ``valid`` of ``mr`` pixels i, lanes l (o = l % w), where over r < rounds,
        p < kc: acc[i][o] += x[a_off + r*a_step + p*a_pstride + i*lda + l] *
        b[b_off + ((r*kc + p)*w + o)*VL + l]. ``res`` is read at y's offsets."""
        ptr = types.CPointer(types.float32)
        sig = types.void(types.intp, types.intp, ptr, types.intp, types.intp, types.intp,
                         types.intp, ptr, types.intp, ptr, types.intp, types.intp, types.intp,
                         ptr, types.intp, ptr, types.boolean, types.boolean)

        def codegen(context, builder, signature, args):
            (kc, rounds, x, a_off, lda, a_pstride, a_step, b, b_off, y, y_off, ldy, valid,
             bias, bias_off, res, has_res, relu) = args
            i64 = ir.IntType(64)
            vec = ir.VectorType(ir.FloatType(), vl)
            vptr = vec.as_pointer()
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{vl}f32")
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
                        new.append(builder.call(fma, [xv, weights[o], acc[i * w + o]]))
                return new

            results = register_loop(builder, vec, kc, rounds, mr * w, start_run, step)
            bias_v = load(bias, bias_off)
            for i in range(mr):
                sums = None
                for ci in range(w):
                    # lane j takes acc[j % w][(j // w) * w + ci]: one source per shuffle step
                    part = results[i * w]
                    lanes = [(j // w) * w + ci if j % w == 0 else j for j in range(vl)]
                    part = builder.shuffle_vector(part, part, ir.Constant(
                        ir.VectorType(ir.IntType(32), vl), lanes))
                    for o in range(1, w):
                        mask = [vl + (j // w) * w + ci if j % w == o else j for j in range(vl)]
                        part = builder.shuffle_vector(part, results[i * w + o], ir.Constant(
                            ir.VectorType(ir.IntType(32), vl), mask))
                    sums = part if sums is None else builder.fadd(sums, part)
                value = builder.fadd(sums, bias_v)
                out_off = builder.add(y_off, builder.mul(const(i), ldy))
                with builder.if_then(builder.icmp_signed(">", valid, const(i))):
                    value = builder.select(has_res, builder.fadd(value, load(res, out_off)),
                                           value)
                    value = builder.select(relu, builder.select(
                        builder.fcmp_ordered("<", value, zero), zero, value), value)
                    builder.store(value, builder.bitcast(builder.gep(y, [out_off]), vptr),
                                  align=4)
        return sig, codegen
    return kernel


_kernels = {w: _make_kernel(VL, w, mr) for w, mr in TILE_ROWS.items()}
_k1 = _kernels[1]
_k2 = _kernels[2]
_k4 = _kernels[4]
_k8 = _kernels.get(8, _kernels[4])     # AVX2 has no 8-wide variant; never called there


def supports(weight_shape, groups):
    """Whether this kernel runs a grouped convolution of these (O, Cin/G, k, k) weights."""
    o, w_in, _, _ = weight_shape
    return w_in in WIDTHS and o // groups == w_in and o % VL == 0


def pack(weight):
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


@njit(**_JIT)
def grouped_small(r0, r1, xp, k, stride, out_h, out_w, w, mr, bp, n_out, bias, residual,
                  has_residual, relu, y2):
    """Output rows [r0, r1) of a grouped convolution with w channels per group, from the
    zero-padded NHWC input ``xp`` (``_gemm.pad_input``); ``bp`` from :func:`pack`; ``mr``
    is ``TILE_ROWS[w]``."""
    _, hp, wp, ch = xp.shape
    tiles = (out_w + mr - 1) // mr
    x_ptr, b_ptr, y_ptr, bias_ptr = _data_ptr(xp), _data_ptr(bp), _data_ptr(y2), \
        _data_ptr(bias)
    res_ptr = _data_ptr(residual) if has_residual else y_ptr
    for r in range(r0, r1):
        n, oy = r // out_h, r % out_h
        for t in range(tiles):
            valid = min(mr, out_w - t * mr)
            for cb in range(ch // VL):
                a_off = ((n * hp + oy * stride) * wp + t * mr * stride) * ch + cb * VL
                y_off = (r * out_w + t * mr) * n_out + cb * VL
                b_off = cb * k * k * w * VL
                if w == 1:
                    _k1(k, k, x_ptr, a_off, stride * ch, ch, wp * ch, b_ptr, b_off, y_ptr, y_off,
                        n_out, valid, bias_ptr, cb * VL, res_ptr, has_residual, relu)
                elif w == 2:
                    _k2(k, k, x_ptr, a_off, stride * ch, ch, wp * ch, b_ptr, b_off, y_ptr, y_off,
                        n_out, valid, bias_ptr, cb * VL, res_ptr, has_residual, relu)
                elif w == 4:
                    _k4(k, k, x_ptr, a_off, stride * ch, ch, wp * ch, b_ptr, b_off, y_ptr, y_off,
                        n_out, valid, bias_ptr, cb * VL, res_ptr, has_residual, relu)
                else:
                    _k8(k, k, x_ptr, a_off, stride * ch, ch, wp * ch, b_ptr, b_off, y_ptr, y_off,
                        n_out, valid, bias_ptr, cb * VL, res_ptr, has_residual, relu)
