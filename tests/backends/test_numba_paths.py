"""The Numba backend's path chooser (``backends/numba/paths.py``) and what each path relies on:
every path is reached, the memory estimate follows the path a call takes, the GEMM and the
padded input the direct kernels read."""

import numpy as np
import pytest

from numres.backends import PassOp

from .conv_cases import CONV_CASES, run_conv
from .test_ops import STRATEGIES

numba = pytest.importorskip("numres.backends.numba", reason="Numba is not installed")
from numres.backends.numba import gemm, grouped, padding, paths, tile  # noqa: E402

ConvPath = numba.ConvPath
own_kernels = pytest.mark.skipif(not tile.AVAILABLE, reason="the CPU has neither AVX-512 nor "
                                 "AVX2+FMA (numres's kernels off, BLAS only)")


def _path(be, case, pooled=False):
    n, c, h, w, o, k, s, p, g = case
    conv = be.prepare_conv(np.ones((o, c // g, k, k), np.float32), None, s, p, g)
    return be.conv_path((n, h, w, c), conv, pooled=pooled)


@own_kernels
@pytest.mark.parametrize("case, tuning, path", [
    ((1, 32, 9, 9, 64, 1, 1, 0, 1), {}, ConvPath.GEMM),             # 1x1: as it lies
    ((1, 32, 9, 9, 64, 3, 2, 1, 1), {}, ConvPath.GEMM),             # ragged rows: gathered
    ((1, 3, 23, 19, 8, 7, 2, 3, 1), {}, ConvPath.DIRECT),           # few channels
    ((4, 64, 14, 14, 64, 3, 1, 1, 1), {}, ConvPath.WINOGRAD),       # 64 tiles
    ((1, 64, 13, 13, 64, 3, 1, 1, 1), {"winograd_min_tiles": 17}, ConvPath.GEMM),
    ((2, 32, 8, 10, 32, 3, 1, 1, 8), {}, ConvPath.GROUPED_LANES),   # 4 per group
    ((1, 20, 6, 6, 20, 3, 1, 1, 5), {}, ConvPath.GROUPED_DIRECT),   # 20: not whole vectors
    ((1, 128, 6, 6, 128, 3, 1, 1, 2), {}, ConvPath.BLAS_GROUPED),   # 64 per group
    ((1, 32, 9, 9, 64, 3, 1, 1, 1), {"own_gemm": False, "winograd": False}, ConvPath.BLAS),
])
def test_the_chooser_names_the_path(case, tuning, path):
    tuning = dict(tuning)
    be = numba.NumbaBackend(winograd=tuning.pop("winograd", True), **tuning)
    assert _path(be, case) is path


@own_kernels
def test_direct_paths_follow_the_tile():
    """Output rows of whole tiles are read directly; the stem, followed by a pool, fused."""
    be = numba.NumbaBackend()
    mr = tile.TILE.mr
    assert _path(be, (1, 32, 4 * mr, 4 * mr, 48, 3, 2, 1, 1)) is ConvPath.DIRECT
    assert _path(be, (1, 32, 2 * mr + 1, 2 * mr + 1, 48, 3, 2, 1, 1)) is ConvPath.GEMM
    assert _path(be, (1, 3, 224, 224, 64, 7, 2, 3, 1), pooled=True) is ConvPath.STEM
    assert _path(be, (1, 32, 9, 9, 64, 1, 1, 0, 1), pooled=True) is ConvPath.GEMM


@own_kernels
def test_the_tests_reach_every_path():
    """``test_ops.py``'s cases and strategies, with the fused stem, run every path."""
    seen = set()
    for strategy in STRATEGIES.values():
        be = numba.NumbaBackend(**strategy)
        for case in CONV_CASES:
            seen.add(_path(be, case))
            seen.add(_path(be, case, pooled=True))
    assert seen == set(ConvPath)


@pytest.mark.parametrize("strategy", ["own-gemm-pixels", "winograd", "blas-rows"])
@pytest.mark.parametrize("case", CONV_CASES[:15], ids=str)
def test_memory_events_come_from_the_path_the_call_takes(monkeypatch, rng, strategy, case):
    """``memory_events`` asks the runner of the path ``conv2d`` runs on, with its shapes."""
    be = numba.NumbaBackend(threads=2, replay=False, **STRATEGIES[strategy])
    ran, described = [], []
    for path, runner in list(paths.RUNNERS.items()):
        def run(*args, _path=path, _run=runner.run):
            ran.append(_path)
            return _run(*args)

        def events(*args, _path=path, _events=runner.events):
            described.append(_path)
            return _events(*args)
        monkeypatch.setitem(paths.RUNNERS, path, paths.Runner(run, events))
    n, c, h, w, o, k, s, p, g = case
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c // g, k, k)).astype(np.float32)
    got = run_conv(be, x, wt, None, s, p, g)
    conv = be.prepare_conv(wt, None, s, p, g)
    events = be.memory_events(PassOp("conv", x.shape, got.shape, k, s, p, g, conv, batch=n))
    assert ran == described and events[0] == ("alloc", "out", got.nbytes)


@own_kernels
@pytest.mark.parametrize("m,k,n", [(1, 3, 5), (13, 147, 64), (16, 40, 33), (100, 300, 70),
                                   (49, 4608, 33)])
def test_gemm_block_on_ragged_shapes(rng, m, k, n):
    """numres's GEMM on ragged shapes: padded rows, short tiles, partial panels, K chunks."""
    tiles = -(-m // gemm.MR)
    a = np.zeros((tiles * gemm.MR, k), np.float32)
    a[:m] = rng.standard_normal((m, k))
    w = rng.standard_normal((k, n)).astype(np.float32)
    packed = gemm.pack_weights(w)
    c = np.full((tiles * gemm.MR, packed.shape[0] * gemm.NR), np.nan, np.float32)
    gemm.gemm_block(a, m, packed, 0, packed.shape[0], c)
    expected = a[:m].astype(np.float64) @ w
    np.testing.assert_allclose(c[:m, :n], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_array_equal(gemm.unpack_weights(packed, n), w)
    assert packed.ctypes.data % 64 == 0


@pytest.mark.parametrize("tile_rows", sorted({tile.TILE.mr, grouped.MR_G,
                                              *grouped.LANE_ROWS.values()}))
@pytest.mark.parametrize("h,w,k,stride,pad", [(3, 3, 3, 2, 1), (1, 1, 3, 1, 1), (9, 5, 7, 2, 3),
                                              (14, 14, 3, 1, 1), (224, 224, 7, 2, 3)])
def test_padded_input_holds_every_read_of_the_direct_kernels(tile_rows, h, w, k, stride, pad):
    """The last tile of the last output row reads (tile_rows - 1) * stride + k pixels from its
    start, wrapping into later rows: all of them must lie inside the padded image."""
    hp, wp = padding.padded_rows(h, w, k, stride, pad, tile_rows)
    out_h = (h + 2 * pad - k) // stride + 1
    out_w = (w + 2 * pad - k) // stride + 1
    last_tile = -(-out_w // tile_rows) - 1
    start = ((out_h - 1) * stride + k - 1) * wp + last_tile * tile_rows * stride
    assert start + (tile_rows - 1) * stride + k <= hp * wp
    assert wp % stride == 0 and wp >= w + 2 * pad


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,h,w,o", [(1, 23, 19, 40), (2, 40, 36, 64), (1, 64, 64, 8),
                                     (3, 9, 30, 64), (2, 2, 3, 8)])
def test_stem_fused_with_max_pool_matches_the_two_ops(rng, threads, n, h, w, o):
    """The stem computes its max pool from bands of rows (``stem.conv_direct_pooled``): the
    same values as the convolution stored whole and pooled after."""
    be = numba.NumbaBackend(threads=threads, replay=False)
    x = be.from_nchw(rng.standard_normal((n, 3, h, w)).astype(np.float32))
    conv = be.prepare_conv(rng.standard_normal((o, 3, 7, 7)).astype(np.float32),
                           rng.standard_normal(o).astype(np.float32), 2, 3, 1)
    fused = be.to_numpy(be.conv2d_max_pool(x, conv, True, 3, 2, 1))
    expected = be.to_numpy(be.max_pool2d(be.conv2d(x, conv, relu=True), 3, 2, 1))
    np.testing.assert_array_equal(fused, expected)
    assert fused.shape == expected.shape and (fused > 0).any()
