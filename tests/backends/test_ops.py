"""Each backend op against the NumPy reference (the oracle), on every code path."""

import threading

import numpy as np
import pytest

import numres
from numres.backends import get_backend
from numres.backends.numpy_backend import NumpyBackend, im2col

ORACLE = NumpyBackend()


def run_conv(backend, x, w, b, stride, padding, groups, relu=False, residual=None):
    """Run one convolution on ``backend`` with NCHW arrays in and out."""
    conv = backend.prepare_conv(w, b, stride, padding, groups)
    act = backend.from_nchw(x)
    res = None if residual is None else backend.from_nchw(residual)
    out = backend.conv2d(act, conv, relu=relu, residual=res)
    return backend.to_numpy(backend.to_nchw(out))


def reference_conv(x, w, b, stride, padding, groups):
    """Direct convolution by definition, float64: independent of every backend."""
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding,) * 2, (padding,) * 2))
    oh, ow = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
    y = np.zeros((n, o, oh, ow))
    og = o // groups
    for g in range(groups):
        for i in range(k):
            for j in range(k):
                patch = xp[:, g * cg:(g + 1) * cg, i:i + stride * oh:stride,
                           j:j + stride * ow:stride]            # (N, Cg, oh, ow)
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch,
                                                       w[g * og:(g + 1) * og, :, i, j])
    return y + (0 if b is None else b[None, :, None, None])


def case_id(case):
    return "n{}c{}h{}w{}o{}k{}s{}p{}g{}".format(*case)


CONV_CASES = [
    # (n, c, h, w, o, k, stride, padding, groups)
    (1, 3, 23, 19, 8, 7, 2, 3, 1),     # stem-like, odd size (Numba: direct, no im2col)
    (2, 3, 2, 3, 8, 7, 2, 3, 1),       # stem on an image smaller than its kernel
    (2, 5, 6, 13, 70, 3, 1, 1, 1),     # few channels, stride 1, a partial weight panel
    (2, 16, 9, 11, 12, 3, 1, 1, 1),    # 3x3 stride 1 (Winograd-capable), partial tiles
    (1, 16, 12, 12, 24, 3, 2, 1, 1),   # 3x3 stride 2
    (3, 32, 7, 7, 16, 1, 1, 0, 1),     # 1x1
    (1, 32, 9, 9, 64, 1, 2, 0, 1),     # strided 1x1 (downsample)
    (2, 32, 8, 10, 32, 3, 1, 1, 8),    # grouped (ResNeXt)
    (1, 64, 5, 6, 64, 3, 2, 1, 32),    # grouped, strided
    (2, 64, 6, 31, 64, 3, 1, 1, 4),    # 16 per group: whole panels, a ragged row tile
    (2, 32, 5, 9, 32, 3, 2, 1, 4),     # 8 per group, strided (Numba: groups across lanes)
    (1, 24, 6, 6, 24, 3, 1, 1, 6),     # 4 per group, channels not a multiple of a vector
    (1, 16, 7, 8, 16, 3, 1, 1, 16),    # depthwise (1 per group)
    (1, 48, 7, 9, 48, 3, 1, 1, 2),     # 24 per group (Numba: per-group GEMMs, not direct)
    (1, 8, 1, 1, 8, 3, 1, 1, 1),       # 1x1 image through a 3x3
    # Output rows of whole 14-pixel tiles (Numba, AVX-512: read directly, no gather):
    (2, 32, 28, 28, 48, 3, 2, 1, 1),   # 3x3 stride 2, a partial weight panel
    (1, 16, 14, 14, 32, 3, 1, 1, 1),   # 3x3 stride 1 (direct where Winograd is not used)
    (2, 32, 28, 27, 40, 1, 2, 0, 1),   # strided 1x1 read from the input itself, odd width
    (1, 64, 7, 7, 48, 3, 1, 1, 1),     # 49 pixels (Numba, AVX-512: 7-row tiles), partial panel
    (1, 256, 28, 28, 272, 3, 2, 1, 1),  # few tiles, 2.6 MB of weights: direct, by panels
]


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv2d_matches_definition(backend, rng, case):
    n, c, h, w, o, k, s, p, g = case
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c // g, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    expected = reference_conv(x, wt, b, s, p, g)
    got = run_conv(get_backend(backend), x, wt, b, s, p, g)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_conv_epilogue(backend, rng):
    x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    wt = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    res = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    expected = np.maximum(reference_conv(x, wt, b, 1, 1, 1) + res, 0)
    got = run_conv(get_backend(backend), x, wt, b, 1, 1, 1, relu=True, residual=res)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert (got >= 0).all() and (got == 0).any()


def test_im2col_layout():
    x = np.arange(2 * 1 * 3 * 3, dtype=np.float32).reshape(2, 1, 3, 3)
    col = im2col(x, 2, 1, 0)                             # (N, C, kh, kw, oh, ow)
    assert col.shape == (2, 1, 2, 2, 2, 2)
    assert col[0, 0, :, :, 0, 0].tolist() == [[0, 1], [3, 4]]
    assert col[1, 0, :, :, 1, 1].tolist() == [[13, 14], [16, 17]]


def test_max_pool_like_torch(backend, rng):
    x = rng.standard_normal((2, 5, 9, 8)).astype(np.float32)
    x[0, 0] = -1e30                              # padding must never win over real values
    x[1, 1, 4, 4] = np.nan                       # NaN propagates, as in torch
    be = get_backend(backend)
    got = be.to_numpy(be.to_nchw(be.max_pool2d(be.from_nchw(x), 3, 2, 1)))
    assert got.shape == (2, 5, 5, 4)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    for i in range(5):
        for j in range(4):
            window = padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            expect = np.where(np.isnan(window).any(axis=(2, 3)), np.nan,
                              np.nanmax(window, axis=(2, 3)))
            np.testing.assert_array_equal(got[:, :, i, j], expect)
    assert (got[0, 0] == -1e30).all()


def test_batch_norm_pool_linear(backend, rng):
    be = get_backend(backend)
    x = rng.standard_normal((2, 6, 5, 4)).astype(np.float32)
    mean, var = rng.standard_normal(6), rng.random(6) + 0.1
    weight, bias = rng.standard_normal(6), rng.standard_normal(6)
    f32 = [a.astype(np.float32) for a in (mean, var, weight, bias)]
    bn = be.prepare_batch_norm(*f32, 1e-5)
    got = be.to_numpy(be.to_nchw(be.batch_norm(be.from_nchw(x), bn, relu=True)))
    expected = np.maximum((x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)
                          * weight[:, None, None] + bias[:, None, None], 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    pooled = be.global_avg_pool(be.from_nchw(x))
    np.testing.assert_allclose(be.to_numpy(pooled), x.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    w, b = rng.standard_normal((3, 6)).astype(np.float32), rng.standard_normal(3).astype(
        np.float32)
    out = be.to_numpy(be.linear(pooled, be.prepare_linear(w, b)))
    np.testing.assert_allclose(out, x.mean(axis=(2, 3)) @ w.T + b, rtol=1e-5, atol=1e-5)


# -- the Numba backend's strategies ---------------------------------------------------------
numba_backend = pytest.importorskip("numres.backends.numba_backend",
                                    reason="Numba is not installed")

STRATEGIES = {
    "own-gemm-pixels": dict(split_rows_min=1),
    "own-gemm-channels": dict(split_rows_min=10 ** 9),
    "blas-rows": dict(own_gemm=False, blas_min_macs=10 ** 12, split_rows_min=1, row_block=16),
    "blas-columns": dict(own_gemm=False, blas_min_macs=10 ** 12, split_rows_min=10 ** 9),
    "blas-threads": dict(own_gemm=False, blas_min_macs=0, blas_min_n=0, blas_chunk=40),
    "winograd": dict(winograd_min_tiles=0, winograd_min_tiles_wide=0),
    "winograd-blas": dict(own_gemm=False, winograd_min_tiles=0, winograd_min_tiles_wide=0),
    "no-winograd": dict(winograd_min_tiles=10 ** 9, winograd_min_tiles_wide=10 ** 9),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_numba_strategies_agree_with_numpy(rng, strategy, threads, case):
    n, c, h, w, o, k, s, p, g = case
    be = numba_backend.NumbaBackend(threads=threads, **STRATEGIES[strategy])
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c // g, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    res = rng.standard_normal(reference_conv(x[:, :1].repeat(c, 1), wt, b, s, p, g).shape
                              ).astype(np.float32)
    expected = run_conv(ORACLE, x, wt, b, s, p, g, relu=True, residual=res)
    got = run_conv(be, x, wt, b, s, p, g, relu=True, residual=res)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("channels", [64, 512])
def test_winograd_error_is_bounded(rng, channels):
    """F(4x4, 3x3) in float32: measured rms error ~1.5e-6 (C=64) to ~4e-6 (C=512) of the
    output's rms, 5-10x direct convolution's; bounded here with ~2x margin."""
    x = rng.standard_normal((1, channels, 14, 14)).astype(np.float32)
    wt = (rng.standard_normal((64, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
    exact = reference_conv(x, wt, None, 1, 1, 1)
    wino = run_conv(numba_backend.NumbaBackend(**STRATEGIES["winograd"]), x, wt, None, 1, 1, 1)

    def rms(a):
        return float(np.sqrt(np.mean(np.square(a))))
    assert rms(wino - exact) / rms(exact) < 1e-5
    assert np.abs(wino - exact).max() / np.abs(exact).max() < 5e-5


def test_results_survive_buffer_reuse(rng):
    """Outputs handed to the caller are never overwritten by later calls (buffers are
    reused across calls)."""
    model = numres.resnet18(num_classes=5, backend="numba")
    a = rng.standard_normal((2, 3, 40, 40)).astype(np.float32)
    b = rng.standard_normal((2, 3, 40, 40)).astype(np.float32)
    out_a = model(a)
    maps_a = model.feature_maps(a)
    saved = out_a.copy(), {k: v.copy() for k, v in maps_a.items()}
    for _ in range(3):
        model(b)
        model.feature_maps(b)
    np.testing.assert_array_equal(out_a, saved[0])
    for k in maps_a:
        np.testing.assert_array_equal(maps_a[k], saved[1][k])


def test_two_threads_share_one_model(backend, rng):
    """Reused buffers must not leak between threads calling the same model at once."""
    model = numres.resnet18(num_classes=7, backend=backend)
    inputs = [rng.standard_normal((2, 3, 48, 48)).astype(np.float32) for _ in range(2)]
    expected = [model(x) for x in inputs]
    errors = []

    def worker(i):
        for _ in range(6):
            out = model(inputs[i])
            if not np.array_equal(out, expected[i]):
                errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.skipif(not numba_backend._gemm.AVAILABLE,
                    reason="the CPU has neither AVX-512 nor AVX2+FMA (numres GEMM off)")
@pytest.mark.parametrize("m,k,n", [(1, 3, 5), (13, 147, 64), (16, 40, 33), (100, 300, 70),
                                   (49, 4608, 33)])
def test_own_gemm_microkernel(rng, m, k, n):
    """The LLVM-IR microkernel on ragged shapes: padded rows, partial panels, K chunks."""
    g = numba_backend._gemm
    tiles = -(-m // g.MR)
    a = np.zeros((tiles * g.MR, k), np.float32)
    a[:m] = rng.standard_normal((m, k))
    w = rng.standard_normal((k, n)).astype(np.float32)
    packed = g.pack_weights(w)
    c = np.full((tiles * g.MR, packed.shape[0] * g.NR), np.nan, np.float32)
    g.gemm_block(a, m, packed, 0, packed.shape[0], c)
    expected = a[:m].astype(np.float64) @ w
    np.testing.assert_allclose(c[:m, :n], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_array_equal(g.unpack_weights(packed, n), w)
    assert packed.ctypes.data % 64 == 0


def test_thread_setting_is_respected(monkeypatch):
    monkeypatch.setenv("NUMRES_NUM_THREADS", "1")
    assert numba_backend.NumbaBackend().executor.threads == 1
    monkeypatch.setenv("NUMRES_NUM_THREADS", "x")
    with pytest.raises(ValueError, match="NUMRES_NUM_THREADS must be an integer"):
        numba_backend.NumbaBackend()


@pytest.mark.skipif(not numba_backend._gemm.AVAILABLE,
                    reason="the CPU has neither AVX-512 nor AVX2+FMA (numres GEMM off)")
@pytest.mark.parametrize("tile_rows", sorted({numba_backend._gemm.MR, numba_backend._gemm.MR_G,
                                              *numba_backend._grouped.TILE_ROWS.values()}))
@pytest.mark.parametrize("h,w,k,stride,pad", [(3, 3, 3, 2, 1), (1, 1, 3, 1, 1), (9, 5, 7, 2, 3),
                                              (14, 14, 3, 1, 1), (224, 224, 7, 2, 3)])
def test_padded_input_holds_every_read_of_the_direct_kernels(tile_rows, h, w, k, stride, pad):
    """The last tile of the last output row reads (tile_rows - 1) * stride + k pixels from its
    start, wrapping into later rows: all of them must lie inside the padded image."""
    hp, wp = numba_backend._gemm.padded_rows(h, w, k, stride, pad, tile_rows)
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
    """The Numba stem computes its max pool from bands of rows (``conv_direct_pooled``):
    the same values as the convolution stored whole and pooled after."""
    be = numba_backend.NumbaBackend(threads=threads, replay=False)
    x = be.from_nchw(rng.standard_normal((n, 3, h, w)).astype(np.float32))
    conv = be.prepare_conv(rng.standard_normal((o, 3, 7, 7)).astype(np.float32),
                           rng.standard_normal(o).astype(np.float32), 2, 3, 1)
    fused = be.to_numpy(be.conv2d_max_pool(x, conv, True, 3, 2, 1))
    expected = be.to_numpy(be.max_pool2d(be.conv2d(x, conv, relu=True), 3, 2, 1))
    np.testing.assert_array_equal(fused, expected)
    assert fused.shape == expected.shape and (fused > 0).any()
