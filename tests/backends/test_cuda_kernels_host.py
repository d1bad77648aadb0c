"""Every CUDA kernel of ``kernels/``, compiled for the CPU from the text the GPU compiles
(``tests/backends/cuda_host``), against the NumPy backend's op.

Exact where the op is exact (layout, im2col, max pooling, the epilogue's float sums); float32
or half rounding elsewhere. Launch geometry as the CuPy backend launches (256 threads, grid
from ``kernels.launch_grid``) and a deliberately small grid, so the grid-stride loops run many
rounds. Indices past 2^31 are checked by sparse spot checks (``cuda_host/spot.py``).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from numres.backends.cupy import kernels
from numres.backends.numpy_backend import NumpyBackend, im2col

from . import cuda_host
from .conv_cases import CONV_CASES, case_id

ORACLE = NumpyBackend()
CTYPES = {"float": np.float32, "__half": np.float16}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["float", "__half"])
def build(request):
    """(ctype, dtype, HostProgram) for each element type; skipped without a compiler."""
    try:
        return request.param, CTYPES[request.param], cuda_host.program(request.param)
    except cuda_host.Unavailable as exc:
        pytest.skip(str(exc))


GRIDS = {"backend-grid": None, "small-grid": 3}


def launch(program, expr, total, *args, grid=None):
    kernel = program.kernel(expr)
    kernel(kernels.launch_grid(total) if grid is None else (grid,), (kernels.BLOCK,), *args)


def nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))            # (N, H, W, C)


def as_half_exact(x, dtype):
    """x rounded to the kernel's type (what the device holds), as float32 for the oracle."""
    return x.astype(dtype).astype(np.float32)


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS)
@pytest.mark.parametrize("shape", [(2, 3, 23, 19), (1, 64, 7, 9), (3, 5, 1, 1)])
def test_layout_kernels_are_exact(build, rng, shape, grid):
    ctype, dtype, program = build
    x = rng.standard_normal(shape).astype(np.float32)
    n, c, h, w = shape
    act = np.full((n, h, w, c), np.nan, dtype)
    launch(program, f"nchw_to_nhwc<{ctype}>", x.size, x, act, n, c, h, w, grid=grid)
    np.testing.assert_array_equal(act, nhwc(x).astype(dtype))        # one rounding to T
    back = np.full(shape, np.nan, np.float32)
    launch(program, f"nhwc_to_nchw<{ctype}>", x.size, act, back, n, c, h, w, grid=grid)
    np.testing.assert_array_equal(back, x.astype(dtype).astype(np.float32))


IM2COL_CASES = [case for case in CONV_CASES if case[8] == 1 and (case[5], case[6]) != (1, 1)]


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS)
@pytest.mark.parametrize("case", IM2COL_CASES, ids=case_id)
def test_im2col_equals_the_numpy_backends_windows(build, rng, case, grid):
    """Every kxk or strided convolution's gather, both vector widths, K padded to 8."""
    ctype, dtype, program = build
    n, c, h, w, _, k, s, p, _ = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    windows = im2col(x, k, s, p)                       # (N, C, kh, kw, oh, ow)
    oh, ow = windows.shape[4:]
    # (N, oh, ow, kh, kw, C): rows m = (n, oy, ox), columns (ky, kx, c) as the GEMM reads them
    rows = windows.transpose(0, 4, 5, 2, 3, 1).reshape(n * oh * ow, k * k * c)
    row_len = kernels.padded_k(k * k * c)
    for vec in sorted({1, kernels.im2col_vec(ctype, c)}):
        cols = np.full((n * oh * ow, row_len), np.nan, dtype)
        launch(program, f"im2col_nhwc<{ctype}, {vec}>", cols.size // vec, nhwc(x), cols,
               n, h, w, c, k, s, p, oh, ow, row_len, grid=grid)
        np.testing.assert_array_equal(cols[:, :k * k * c], rows)
        assert (cols[:, k * k * c:] == 0).all()           # the padding the GEMM multiplies


def grouped_weights(wt, groups):
    """(O, Cg, k, k) -> (k*k*Cg, O): the layout conv_grouped_nhwc reads."""
    o, cg, k, _ = wt.shape
    return np.ascontiguousarray(wt.transpose(2, 3, 1, 0).reshape(k * k * cg, o))


GROUPED_CASES = [case for case in CONV_CASES if case[8] > 1] + [
    (1, 8, 5, 7, 12, 3, 1, 1, 1),      # the direct kernel with one group
    (2, 6, 9, 4, 6, 3, 2, 1, 3)]       # 2 channels per group, strided


@pytest.mark.parametrize("epilogue", ["plain", "relu+residual"])
@pytest.mark.parametrize("case", GROUPED_CASES, ids=case_id)
def test_grouped_convolution_matches_numpy(build, rng, case, epilogue):
    """Direct grouped convolution with its fused epilogue (bias, residual, ReLU) against the
    NumPy backend on the same (type-rounded) inputs; float sums, one rounding to T."""
    ctype, dtype, program = build
    n, c, h, w, o, k, s, p, g = case
    x = as_half_exact(rng.standard_normal((n, c, h, w)).astype(np.float32), dtype)
    wt = as_half_exact(rng.standard_normal((o, c // g, k, k)).astype(np.float32) / 3, dtype)
    b = as_half_exact(rng.standard_normal(o).astype(np.float32), dtype)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    relu = epilogue != "plain"
    res = as_half_exact(rng.standard_normal((n, o, oh, ow)).astype(np.float32), dtype) \
        if relu else None
    conv = ORACLE.prepare_conv(wt.astype(np.float64).astype(np.float32), b, s, p, g)
    expected = ORACLE.conv2d(x, conv, relu=relu, residual=None if res is None else res.copy())
    out = np.full((n, oh, ow, o), np.nan, dtype)
    launch(program, f"conv_grouped_nhwc<{ctype}>", out.size, nhwc(x).astype(dtype),
           grouped_weights(wt, g).astype(dtype), b.astype(dtype),
           None if res is None else nhwc(res).astype(dtype), int(relu), out, n, h, w, c, k,
           s, p, oh, ow, o, g, int(relu))
    got = out.astype(np.float32).transpose(0, 3, 1, 2)
    scale = np.abs(expected).max()
    # float32: two summation orders of <= 576 products; half: the one rounding on store
    tol = 2e-6 * scale if dtype == np.float32 else np.abs(expected) * 2 ** -11 + 1e-6 * scale
    np.testing.assert_array_less(np.abs(got - expected), tol + 1e-30)
    if relu:
        assert (got >= 0).all() and (got == 0).any()


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS)
@pytest.mark.parametrize("residual,relu", [(False, False), (True, True), (False, True)])
def test_bias_act_epilogue_is_exact(build, rng, residual, relu, grid):
    """The epilogue run after a GEMM that could not fuse it: (y + bias) + residual, ReLU, in
    float, one rounding (the same sums NumPy does in float32)."""
    ctype, dtype, program = build
    m, o = 37, 70
    y = rng.standard_normal((m, o)).astype(dtype)
    bias = rng.standard_normal(o).astype(dtype)
    res = rng.standard_normal((m, o)).astype(dtype)
    expected = y.astype(np.float32) + bias.astype(np.float32)
    if residual:
        expected = expected + res.astype(np.float32)
    if relu:
        expected = np.maximum(expected, 0)
    launch(program, f"bias_act<{ctype}>", y.size, y, bias, res if residual else None,
           int(residual), m, o, int(relu), grid=grid)
    np.testing.assert_array_equal(y, expected.astype(dtype))


def test_batch_norm_matches_numpy(build, rng):
    ctype, dtype, program = build
    x = as_half_exact(rng.standard_normal((2, 6, 5, 4)).astype(np.float32), dtype)
    res = as_half_exact(rng.standard_normal((2, 6, 5, 4)).astype(np.float32), dtype)
    mean, var = rng.standard_normal(6), rng.random(6) + 0.1
    weight, bias = rng.standard_normal(6), rng.standard_normal(6)
    f32 = [a.astype(np.float32) for a in (mean, var, weight, bias)]
    bn = ORACLE.prepare_batch_norm(*f32, 1e-5)
    expected = ORACLE.batch_norm(x, bn, relu=True, residual=res.copy())
    scale = weight / np.sqrt(var + 1e-5)
    shift = bias - mean * scale
    out = np.full((2, 5, 4, 6), np.nan, dtype)
    launch(program, f"batch_norm<{ctype}>", out.size, nhwc(x).astype(dtype),
           scale.astype(np.float32), shift.astype(np.float32), nhwc(res).astype(dtype), 1,
           out, 2 * 5 * 4, 6, 1)
    got = out.astype(np.float32).transpose(0, 3, 1, 2)
    tol = 1e-5 if dtype == np.float32 else 2 ** -10
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS)
@pytest.mark.parametrize("geometry", [(3, 2, 1), (2, 2, 0), (3, 1, 1), (1, 2, 0)])
def test_max_pool_is_exact_with_torchs_padding_and_nan(build, rng, geometry, grid):
    ctype, dtype, program = build
    k, s, p = geometry
    x = rng.standard_normal((2, 5, 9, 8)).astype(dtype)
    x[0, 0] = -6e4                         # padding must never win over real values
    x[1, 1, 4, 4] = np.nan                 # NaN propagates, as in torch
    expected = ORACLE.max_pool2d(x.astype(np.float32), k, s, p)
    oh, ow = expected.shape[2:]
    out = np.zeros((2, oh, ow, 5), dtype)
    launch(program, f"max_pool_nhwc<{ctype}>", out.size, nhwc(x), out, 2, 9, 8, 5, k, s, p,
           oh, ow, grid=grid)
    np.testing.assert_array_equal(out.astype(np.float32).transpose(0, 3, 1, 2), expected)


@pytest.mark.parametrize("shape", [(2, 6, 5, 4), (3, 64, 7, 7), (1, 3, 1, 1)])
def test_global_avg_pool_matches_numpy(build, rng, shape):
    ctype, dtype, program = build
    x = rng.standard_normal(shape).astype(dtype)
    n, c, h, w = shape
    out = np.full((n, c), np.nan, dtype)
    launch(program, f"global_avg_pool_nhwc<{ctype}>", out.size, nhwc(x), out, n, h * w, c)
    expected = ORACLE.global_avg_pool(x.astype(np.float32))
    tol = 1e-6 if dtype == np.float32 else 2 ** -11
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=tol, atol=tol)


def test_every_instantiation_is_launchable_on_the_host(build):
    """The host build has exactly the kernels the backend asks NVRTC for."""
    ctype, _, program = build
    wanted = set(kernels.name_expressions(ctype))
    assert wanted <= set(program.names)
    others = {"float": "__half", "__half": "float"}[ctype]
    if ctype == "float":        # the float build leaves every __half kernel out
        assert not any(others in name for name in program.names)


def test_the_kernel_text_has_no_host_conditionals():
    """The emulation is honest only if kernels/ compiles the same text for both: the only
    conditional there is NUMRES_NO_HALF, which the backend sets too."""
    for name in kernels.SOURCES + (kernels.HEADER,):
        for line in kernels.kernel_source(name).splitlines():
            directive = line.strip()
            if directive.startswith("#") and not directive.startswith(("#include", "#pragma")):
                assert directive in ("#ifndef NUMRES_NO_HALF", "#endif") or \
                    directive.startswith("#define FOR_EACH") or directive.endswith("\\"), \
                    (name, line)


def test_a_missing_compiler_is_a_reason_to_skip(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(cuda_host.Unavailable, match="is not installed"):
        cuda_host.HostProgram(kernels.program_source(), kernels.compile_options("float"))


@pytest.mark.parametrize("family", ["layout", "im2col", "conv_grouped", "bias_act",
                                    "batch_norm", "max_pool", "avg_pool"])
def test_indices_past_2_31_by_spot_checks(family):
    """Each kernel on a tensor of more than 2^31 elements: sparse memory (reserved, not
    allocated), the backend's real grid, a few blocks run whole (their grid-stride rounds
    reach past 2^31), each element checked against the definition. In a child process: a
    wrong 32-bit index would read outside the mapping and crash it."""
    done = subprocess.run([sys.executable, "-m", "tests.backends.cuda_host.spot", family],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode == 77:
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checked" in done.stdout
