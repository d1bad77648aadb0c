"""Each backend op against the NumPy reference (the oracle), on every code path."""

import numpy as np
import pytest

import numres
from numres.backends import get_backend
from numres.backends.numpy_backend import NumpyBackend, im2col

# Shared with the CUDA tests, which must collect where Numba is missing (this file skips).
from .conv_cases import (CONV_CASES, calls_from_two_threads_differ, case_id, reference_conv,
                         run_conv)

ORACLE = NumpyBackend()


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
numba = pytest.importorskip("numres.backends.numba", reason="Numba is not installed")

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
    be = numba.NumbaBackend(threads=threads, **STRATEGIES[strategy])
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
    wino = run_conv(numba.NumbaBackend(**STRATEGIES["winograd"]), x, wt, None, 1, 1, 1)

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
    assert calls_from_two_threads_differ(model, inputs, rounds=6) == []


def test_thread_setting_is_respected(monkeypatch):
    monkeypatch.setenv("NUMRES_NUM_THREADS", "1")
    assert numba.NumbaBackend().executor.threads == 1
    monkeypatch.setenv("NUMRES_NUM_THREADS", "x")
    with pytest.raises(ValueError, match="NUMRES_NUM_THREADS must be an integer"):
        numba.NumbaBackend()
