"""The GEMM microkernel, written in LLVM IR through Numba intrinsics (Numba has no vector
types; LLVM turns the ``<vl x float>`` operations into AVX-512 or AVX2 instructions).

Operands are float32, or bfloat16 pairs (``precision="bfloat16"``, ``pairs.py``): where A and
B are uint32 arrays, each element holds two bf16 values adjacent along the reduction, and a
step multiplies pairs with AVX512_BF16's ``vdpbf16ps`` (two products per lane added to a
float32 sum: twice the multiply-adds of an FMA per instruction). The kernel picks the body
from its operands' types, so the GEMM and direct kernels serve both.

:func:`make_microkernel` builds the kernel for one tile width (``tile.py``): it computes an
``mr x nr`` block of ``C = A @ B`` in vector registers, where A is read where it lies
(row-major, any row stride: an activation, an im2col block, a padded image) and B is a
packed panel of weights (``nr`` floats per step of the reduction). A call names its operands
with the small records below, so that a call site reads as what it does::

    microkernel(mr, kc, rounds, Rows(a, offset, ld, step), Panel(b, offset),
                Out(c, offset, ld, accumulate), Finish(...) or plain(c), Prefetch(at, step))

``Finish`` applies bias, residual and ReLU to the tile before it is stored (the fused
epilogue; C can then be the layer's output itself); ``plain(ptr)`` stores the sums as they
are. :func:`register_loop` is the loop skeleton this kernel shares with the grouped-lanes
kernel (``grouped.py``).
"""

from collections import namedtuple

from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .kernels import helper

Rows = namedtuple("Rows", "ptr offset ld step")
Rows.__doc__ = """The A operand: row i of run r starts ``offset + r * step + i * ld`` floats
past ``ptr``."""
Panel = namedtuple("Panel", "ptr offset")
Panel.__doc__ = """The B operand: ``nr`` floats per reduction step from ``ptr + offset``."""
Out = namedtuple("Out", "ptr offset ld accumulate")
Out.__doc__ = """Where the tile goes: row i at ``ptr + offset + i * ld``; ``accumulate`` adds
the sums to what is there (a later chunk of the reduction)."""
Finish = namedtuple("Finish", "apply bias bias_offset residual residual_offset residual_ld "
                              "has_residual relu")
Finish.__doc__ = """The epilogue of the tile where ``apply`` (the last chunk): ``+ bias[bias_offset
+ j]``, ``+ residual[residual_offset + i * residual_ld + j]`` if ``has_residual``, ReLU if
``relu`` (NaN stays NaN, as in torch)."""
Prefetch = namedtuple("Prefetch", "offset step")
Prefetch.__doc__ = """Each reduction step q also prefetches two cache lines of B at ``offset +
q * step``: the weights the caller multiplies next (``gemm.next_chunk``)."""

_FLOATS = types.CPointer(types.float32)
#: Pointers to bf16 pairs (``pairs.py``): A and B of the bf16 body.
PAIRS = types.CPointer(types.uint32)
_FIELD_TYPES = {
    "a": (_FLOATS, types.intp, types.intp, types.intp),
    "b": (_FLOATS, types.intp),
    "c": (_FLOATS, types.intp, types.intp, types.boolean),
    "finish": (types.boolean, _FLOATS, types.intp, _FLOATS, types.intp, types.intp,
               types.boolean, types.boolean),
    "prefetch": (types.intp, types.intp),
}


@intrinsic
def data_ptr(typingctx, arr):
    """The data pointer of a float32 array, or of a uint32 array of bf16 pairs."""
    sig = types.CPointer(arr.dtype)(arr)

    def codegen(context, builder, signature, args):
        return context.make_array(signature.args[0])(context, builder, args[0]).data
    return sig, codegen


@helper
def plain(ptr):
    """A :class:`Finish` that applies nothing: the tile is stored as summed."""
    return Finish(False, ptr, 0, ptr, 0, 0, False, False)


def record_values(context, builder, tuple_type, value, name):
    """The fields of a record argument (:class:`Rows` ... :class:`Prefetch`, by ``name``:
    ``"a"``, ``"b"``, ``"c"``, ``"finish"``, ``"prefetch"``), each cast to the type the
    kernels expect (in an intrinsic's codegen)."""
    wanted = _FIELD_TYPES[name]
    if not isinstance(tuple_type, types.BaseTuple) or len(tuple_type) != len(wanted):
        raise TypeError(f"microkernel argument {name!r}: expected {len(wanted)} fields, "
                        f"got {tuple_type}")
    if name in ("a", "b") and tuple_type.types[0] == PAIRS:
        wanted = (PAIRS,) + wanted[1:]
    values = cgutils.unpack_tuple(builder, value, len(wanted))
    return [context.cast(builder, v, have, want)
            for v, have, want in zip(values, tuple_type.types, wanted)]


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


def make_microkernel(vl, nr, heights, line=16, row_strides=(), prefetch_b=True):
    """The microkernel for tiles ``nr`` floats wide, ``vl`` floats per vector, one body per
    tile height in ``heights`` (a call's ``mr`` picks one; a call with another height does
    nothing). ``line``: floats per cache line. ``row_strides``: A row strides (``Rows.ld``)
    to compile bodies for with the stride a constant; calls with others take the general
    body. ``prefetch_b=False`` leaves out :class:`Prefetch`'s two lines of B per step (for
    callers whose weights stay in L1: two load slots of 17 per step of a one-vector tile).

    Why constant strides: with ``mr`` rows at a stride known only at run time, the body keeps
    a pointer per row, more than x86-64 has registers, and reloads the spilled ones every
    step (8 loads beside the 15 of a step of a one-vector-wide tile: the grouped kernel ran
    at half the FMA peak). A constant stride makes every row one base register plus a
    displacement.

    The kernel: ``C[i, j] (+)= sum over r < rounds, p < kc of A[r, i, p] * B[r*kc + p, j]``
    for ``i < mr``, ``j < nr``, operands as :class:`Rows`, :class:`Panel`, :class:`Out`,
    then :class:`Finish` and :class:`Prefetch`. ``rounds`` > 1 walks A in several runs of
    ``kc`` (a direct convolution's kernel rows) while the accumulators stay in registers; a
    plain GEMM block is ``rounds = 1``. With A and B pointers to bf16 pairs (:data:`PAIRS`;
    both or neither), offsets, strides and ``kc`` count pairs, and ``A[r, i, p] * B[..., j]``
    is the sum of a pair's two products; C stays float32.
    """
    heights = tuple(dict.fromkeys(heights))        # distinct, in order

    @intrinsic
    def microkernel(typingctx, mr, kc, rounds, a, b, c, finish, prefetch):
        sig = types.void(types.intp, types.intp, types.intp, a, b, c, finish, prefetch)

        def codegen(context, builder, signature, args):
            mr, kc, rounds = args[:3]
            fields = [record_values(context, builder, t, v, name) for t, v, name in
                      zip(signature.args[3:], args[3:], ("a", "b", "c", "finish", "prefetch"))]
            pairs = signature.args[3].types[0] == PAIRS
            if pairs != (signature.args[4].types[0] == PAIRS):
                raise TypeError("microkernel: A and B must both be float32 or both bf16 pairs")
            i64 = ir.IntType(64)
            for height in heights:
                is_height = builder.icmp_signed("==", mr, ir.Constant(i64, height))
                with builder.if_then(is_height):
                    _strided_bodies(builder, vl, height, nr, line, kc, rounds, fields, pairs,
                                    row_strides, prefetch_b)
            return context.get_dummy_value()
        return sig, codegen
    return microkernel


def _strided_bodies(builder, vl, mr, nr, line, kc, rounds, fields, pairs, row_strides,
                    prefetch_b):
    """One body per constant row stride in ``row_strides`` (the call's ``Rows.ld`` picks
    one), and the general body for any other."""
    a, rest = fields[0], fields[1:]
    lda = a[2]
    done = builder.append_basic_block("strides.done")
    for ld in row_strides:
        constant = ir.Constant(lda.type, ld)
        with builder.if_then(builder.icmp_signed("==", lda, constant)):
            _body(builder, vl, mr, nr, line, kc, rounds, (a[0], a[1], constant, a[3]), *rest,
                  pairs=pairs, prefetch_b=prefetch_b)
            builder.branch(done)
    _body(builder, vl, mr, nr, line, kc, rounds, a, *rest, pairs=pairs, prefetch_b=prefetch_b)
    builder.branch(done)
    builder.position_at_end(done)


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no such type): the element type the AVX512_BF16
    intrinsics are declared with. Pairs are bitcast to vectors of it at each call."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


def multiply_add(builder, vl, pairs):
    """``f(a, b, acc)``: ``acc + a * b`` on float32 vectors (an FMA), or with ``pairs`` on
    ``<vl x i32>`` vectors of bf16 pairs, each lane adding both products (``vdpbf16ps``)."""
    vec = ir.VectorType(ir.FloatType(), vl)
    if not pairs:
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{vl}f32")
        return lambda a, b, acc: builder.call(fma, [a, b, acc])
    # LLVM 17 declared the operands as bfloat vectors; before, as i32 vectors of pairs.
    if llvm_binding.llvm_version_info >= (17,):
        bvec = ir.VectorType(_BFloat(), 2 * vl)
    else:
        bvec = ir.VectorType(ir.IntType(32), vl)
    bits = {16: 512, 8: 256}[vl]
    dot = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vec, [vec, bvec, bvec]),
        f"llvm.x86.avx512bf16.dpbf16ps.{bits}")
    return lambda a, b, acc: builder.call(
        dot, [acc, builder.bitcast(a, bvec), builder.bitcast(b, bvec)])


def _body(builder, vl, mr, nr, line, kc, rounds, a, b, c, finish, prefetch, pairs=False,
          prefetch_b=True):
    """The IR of one tile height (see :func:`make_microkernel`)."""
    a, a_off, lda, a_step = a
    b, b_off = b
    c, c_off, ldc, accumulate = c
    final, bias, bias_off, res, res_off, ldr, has_res, relu = finish
    pf_off, pf_step = prefetch
    nv = nr // vl
    i64 = ir.IntType(64)
    vec = ir.VectorType(ir.FloatType(), vl)
    vptr = vec.as_pointer()
    # What A and B hold: float32 lanes, or bf16 pairs as 32-bit lanes.
    operand = ir.VectorType(ir.IntType(32), vl) if pairs else vec
    madd = multiply_add(builder, vl, pairs)
    i8ptr = ir.IntType(8).as_pointer()
    prefetch_fn = cgutils.get_or_insert_function(
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
    row_lines = -(-nr // line)           # cache lines per tile row
    tile_lines = mr * row_lines

    def start_run(r):               # one run of kc steps of A and B
        a_run = builder.gep(a, [builder.mul(r, a_step)])
        b_run = builder.gep(b, [builder.mul(builder.mul(r, kc), const(nr))])
        a_rows = [builder.gep(a_run, [builder.mul(const(i), lda)]) for i in range(mr)]
        return a_rows, b_run

    def step(run, r, p, acc):
        a_rows, b_run = run
        b_row = builder.gep(b_run, [builder.mul(p, const(nr))])
        bv = [builder.load(builder.bitcast(builder.gep(b_row, [const(vl * v)]),
                                           operand.as_pointer()), align=4) for v in range(nv)]
        q = builder.add(builder.mul(r, kc), p)
        pf_row = builder.gep(pf, [builder.mul(q, pf_step)])
        for ahead_line in range(2 if prefetch_b else 0):
            ahead = builder.bitcast(builder.gep(pf_row, [const(line * ahead_line)]), i8ptr)
            builder.call(prefetch_fn, [ahead, i32(0), i32(3), i32(1)])
        # The tile's output lines (and residual lines, if it adds them), then the next
        # tile's (mr rows further, where callers go next), one per step while the multiply
        # runs: they are usually out of L2 (a layer's output, the block's input), and
        # fetching them only at the stores stalled.
        with builder.if_then(builder.icmp_signed("<", q, const(2 * tile_lines)),
                             likely=False):
            row = builder.udiv(q, const(row_lines))
            offset = builder.mul(builder.urem(q, const(row_lines)), const(line))
            out_line = builder.gep(c, [builder.add(builder.mul(row, ldc), offset)])
            builder.call(prefetch_fn, [builder.bitcast(out_line, i8ptr), i32(1), i32(3),
                                       i32(1)])
            with builder.if_then(builder.and_(final, has_res)):
                res_line = builder.gep(res_tile, [builder.add(builder.mul(row, ldr), offset)])
                builder.call(prefetch_fn, [builder.bitcast(res_line, i8ptr), i32(0),
                                           i32(3), i32(1)])
        new = []
        for i in range(mr):
            s = builder.load(builder.gep(a_rows[i], [p]), align=4)
            sv = builder.shuffle_vector(
                builder.insert_element(ir.Constant(operand, ir.Undefined), s, i32(0)),
                ir.Constant(operand, ir.Undefined), splat)
            for v in range(nv):
                new.append(madd(sv, bv[v], acc[i * nv + v]))
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

    def finish_tile(with_res, with_relu):
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

    with builder.if_else(final) as (epilogue, stored):
        with epilogue:
            with builder.if_else(has_res) as branches:
                for with_res, branch in zip((True, False), branches):
                    with branch:
                        with builder.if_else(relu) as (yes, no):
                            with yes:
                                finish_tile(with_res, True)
                            with no:
                                finish_tile(with_res, False)
        with stored:
            for total, where in zip(totals, places):
                builder.store(total, where, align=4)
