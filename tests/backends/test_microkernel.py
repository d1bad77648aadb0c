"""The LLVM-IR kernels (``backends/numba/microkernel.py``, ``grouped.py``) on every tile this CPU
can run: an AVX-512 machine checks the AVX2 tiles too, which its own configuration never
uses. Each kernel is compiled here for the tile under test (not from Numba's cache)."""

import numpy as np
import pytest
from numba import njit

pytest.importorskip("numres.backends.numba", reason="Numba is not installed")
from numres.backends.numba import tile  # noqa: E402
from numres.backends.numba.grouped import make_lanes_kernel  # noqa: E402
from numres.backends.numba.microkernel import (Finish, Out, Panel, Prefetch, Rows,  # noqa: E402
                                               data_ptr, make_microkernel)

HOST = tile.host_tiles()
TILES = sorted({(t.isa, mr, nr, t.vl, t.line) for t in HOST for _, mr, nr in t.variants()})
LANES = [(t.isa, t.vl, w, rows) for t in HOST for w, rows in t.lane_rows.items()]
pytestmark = pytest.mark.skipif(not HOST, reason="the CPU has neither AVX-512 nor AVX2+FMA")


def test_declared_tiles_fit_their_registers():
    for declared in tile.DECLARED.values():
        for name, mr, nr in declared.variants():
            assert declared.registers_used(mr, nr) <= declared.registers, (declared.isa, name)
    assert tile.DECLARED["avx512"].variants() == (
        ("main", 14, 32), ("short", 8, 32), ("half", 7, 32), ("grouped", 14, 16),
        ("grouped half", 7, 16), ("grouped wide", 14, 32), ("grouped wide half", 7, 32))
    assert tile.DECLARED["avx2"].variants() == (
        ("main", 6, 16), ("short", 6, 16), ("half", 6, 16), ("grouped", 12, 8),
        ("grouped half", 7, 8), ("grouped wide", 12, 8), ("grouped wide half", 7, 8))
    assert tile.DECLARED["avx512"].lane_rows == {1: 24, 2: 12, 4: 6, 8: 2}
    assert tile.DECLARED["avx2"].lane_rows == {1: 12, 2: 6, 4: 2}
    with pytest.raises(ValueError, match="vector registers"):
        tile.Tile("too-tall", vl=16, registers=32, mr=16, nr=32)


_drivers = {}


def _driver(mr, nr, vl, line, row_strides=(), prefetch_b=True):
    """A compiled function making one microkernel call for tiles ``mr x nr``."""
    key = (mr, nr, vl, line, row_strides, prefetch_b)
    if key not in _drivers:
        kernel = make_microkernel(vl, nr, (mr,), line, row_strides, prefetch_b)

        @njit(nogil=True, error_model="numpy", boundscheck=False)
        def run(kc, rounds, a, lda, a_step, b, c, ldc, accumulate, final, bias, res, has_res,
                relu):
            kernel(mr, kc, rounds, Rows(data_ptr(a), 0, lda, a_step), Panel(data_ptr(b), 0),
                   Out(data_ptr(c), 0, ldc, accumulate),
                   Finish(final, data_ptr(bias), 0, data_ptr(res), 0, ldc, has_res, relu),
                   Prefetch(0, 1))
        _drivers[key] = run
    return _drivers[key]


def _expected(a, lda, a_step, b, mr, kc, rounds):
    """The microkernel's sums in float64: A's ``mr`` rows ``lda`` apart, runs ``a_step``
    apart, times B's rows."""
    out = np.zeros((mr, b.shape[1]))
    for r in range(rounds):
        rows = np.stack([a[r * a_step + i * lda:r * a_step + i * lda + kc] for i in range(mr)])
        out += rows.astype(np.float64) @ b[r * kc:(r + 1) * kc]
    return out


@pytest.mark.parametrize("isa, mr, nr, vl, line", TILES, ids=lambda v: str(v))
@pytest.mark.parametrize("kc, rounds", [(1, 1), (37, 1), (16, 3), (0, 1)])
def test_microkernel_multiplies_and_finishes(rng, isa, mr, nr, vl, line, kc, rounds):
    run = _driver(mr, nr, vl, line)
    lda, a_step, ldc = kc * rounds + 3, kc + 1, nr + 5
    a = rng.standard_normal(mr * lda + rounds * a_step + kc).astype(np.float32)
    b = rng.standard_normal((rounds * kc + 1, nr)).astype(np.float32)   # +1: prefetched
    bias = rng.standard_normal(nr).astype(np.float32)
    res = rng.standard_normal((mr, ldc)).astype(np.float32)
    expected = _expected(a, lda, a_step, b, mr, kc, rounds)

    c = np.full((mr, ldc), np.nan, np.float32)
    run(kc, rounds, a, lda, a_step, b, c, ldc, False, False, bias, res, False, False)
    np.testing.assert_allclose(c[:, :nr], expected, rtol=1e-5, atol=1e-4)
    assert np.isnan(c[:, nr:]).all()                  # nothing past the tile's columns
    sums = c[:, :nr].copy()

    again = c.copy()                                  # a later chunk adds to what is there
    run(kc, rounds, a, lda, a_step, b, again, ldc, True, False, bias, res, False, False)
    np.testing.assert_array_equal(again[:, :nr], sums + sums)

    for has_res in (False, True):
        for relu in (False, True):
            out = np.full((mr, ldc), np.nan, np.float32)
            run(kc, rounds, a, lda, a_step, b, out, ldc, False, True, bias, res, has_res, relu)
            want = sums + bias
            if has_res:
                want = want + res[:, :nr]
            if relu:
                want = np.where(want < 0, np.float32(0), want)
            np.testing.assert_array_equal(out[:, :nr], want)


@pytest.mark.parametrize("isa, mr, nr, vl, line", TILES, ids=lambda v: str(v))
def test_constant_row_strides_compute_what_the_general_body_does(rng, isa, mr, nr, vl, line):
    """A body compiled for a constant A row stride (and without B prefetches) serves calls
    with that stride; calls with any other stride take the general body. Both sum the
    same products in the same order, so the results are equal to the bit."""
    kc, rounds, a_step, ldc = 20, 3, 21, nr + 3
    constant = kc * rounds + 5
    run = _driver(mr, nr, vl, line, row_strides=(constant, 4 * constant), prefetch_b=False)
    general = _driver(mr, nr, vl, line)
    b = rng.standard_normal((rounds * kc + 1, nr)).astype(np.float32)
    bias = rng.standard_normal(nr).astype(np.float32)
    res = rng.standard_normal((mr, ldc)).astype(np.float32)
    for lda in (constant, constant + 1, 4 * constant):
        a = rng.standard_normal(mr * lda + rounds * a_step + kc).astype(np.float32)
        expected = _expected(a, lda, a_step, b, mr, kc, rounds)
        outs = []
        for kernel in (run, general):
            c = np.full((mr, ldc), np.nan, np.float32)
            kernel(kc, rounds, a, lda, a_step, b, c, ldc, False, True, bias, res, True, False)
            outs.append(c)
        np.testing.assert_allclose(outs[0][:, :nr], expected + bias + res[:, :nr], rtol=1e-5,
                                   atol=1e-4)
        np.testing.assert_array_equal(outs[0], outs[1])


_lanes_drivers = {}


def _lanes_driver(vl, w, rows):
    key = (vl, w, rows)
    if key not in _lanes_drivers:
        kernel = make_lanes_kernel(vl, {w: rows})

        @njit(nogil=True, error_model="numpy", boundscheck=False)
        def run(kc, rounds, x, lda, tap, a_step, b, y, ldy, valid, bias, res, has_res, relu):
            kernel(w, kc, rounds, Rows(data_ptr(x), 0, lda, a_step), tap,
                   Panel(data_ptr(b), 0), Out(data_ptr(y), 0, ldy, False), valid,
                   Finish(True, data_ptr(bias), 0, data_ptr(res), 0, ldy, has_res, relu))
        _lanes_drivers[key] = run
    return _lanes_drivers[key]


@pytest.mark.parametrize("isa, vl, w, rows", LANES, ids=lambda v: str(v))
def test_lanes_kernel_sums_whole_groups(rng, isa, vl, w, rows):
    """Each vector holds vl / w whole groups; output lane (group g, channel o) sums its
    group's w lanes of accumulator o."""
    run = _lanes_driver(vl, w, rows)
    kc, rounds, tap, lda, a_step, ldy = 3, 2, vl + 2, 3 * vl + 7, 5 * vl, vl + 3
    x = rng.standard_normal(rows * lda + rounds * a_step + kc * tap + vl).astype(np.float32)
    b = rng.standard_normal((rounds * kc, w, vl)).astype(np.float32)
    bias = rng.standard_normal(vl).astype(np.float32)
    res = rng.standard_normal((rows, ldy)).astype(np.float32)
    valid = max(1, rows - 1)
    expected = np.zeros((rows, vl))
    for i in range(rows):
        for lane in range(vl):
            g, o = lane // w, lane % w
            for r in range(rounds):
                for p in range(kc):
                    at = r * a_step + p * tap + i * lda + g * w
                    expected[i, lane] += x[at:at + w].astype(np.float64) @ \
                        b[r * kc + p, o, g * w:(g + 1) * w]
    expected += bias + res[:, :vl]
    y = np.full((rows, ldy), np.nan, np.float32)
    run(kc, rounds, x, lda, tap, a_step, b, y, ldy, valid, bias, res, True, True)
    np.testing.assert_allclose(y[:valid, :vl], np.maximum(expected[:valid], 0), rtol=1e-5,
                               atol=1e-4)
    assert np.isnan(y[valid:]).all() and np.isnan(y[:, vl:]).all()
