"""The CUDA backend, on any machine.

Where the real CuPy has a GPU these tests run on it (``benchmarks/gpu_check.sh`` runs this
file there); everywhere else (CI) on the CuPy stand-in (``cupy_standin/``), which runs
numres's kernels compiled for the CPU, emulates cuBLASLt, streams, events and CUDA graphs,
and refuses what CuPy and CUDA refuse. Tests that call ``emulator_only`` check what only the
emulator can see (races, allocations during a capture, the cuBLASLt calls made); on a GPU they
skip.

"Defect N" refers to the CUDA backend as it was before issue 10; each test named for one
failed on that code (the issue's note records how).
"""

import gc
import importlib.util
import re
import shutil
import subprocess
import sys
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

import numres
from numres import BackendUnavailable
from numres.backends import get_backend
from numres.backends.cupy import kernels
from numres.backends.numpy_backend import NumpyBackend
from numres.models import memory

from .conftest import real_cupy_has_a_gpu
from .conv_cases import (CONV_CASES, calls_from_two_threads_differ, case_id, reference_conv,
                         run_conv)

ORACLE = NumpyBackend()
ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
bench_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_gpu)


def emulator_only(cuda):
    if cuda.standin is None:
        pytest.skip("checks what only the CuPy stand-in can see")
    return cuda.standin


# -- the kernels compile for the GPU (no GPU needed) -------------------------------------------
@pytest.mark.parametrize("half", [True, False], ids=["with-half", "float-only"])
@pytest.mark.parametrize("source", kernels.SOURCES)
def test_kernels_compile_with_nvcc(tmp_path, source, half):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    cmd = [nvcc, "-std=c++17", "-arch=sm_90", "-Werror", "all-warnings", "-c",
           str(kernels.kernel_dir() / source), "-o", str(tmp_path / "k.o")]
    done = subprocess.run(cmd + ([] if half else ["-DNUMRES_NO_HALF"]), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("ctype", ["float", "__half"])
def test_program_compiles_with_nvrtc_as_cupy_does(ctype):
    """CuPy compiles the program text with NVRTC at run time, which (unlike nvcc) sees no
    host headers: this caught an undefined INFINITY. No GPU is needed."""
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc",
                                reason="CuPy is not installed")
    if ctype == "__half" and not kernels.half_include_dirs():
        pytest.skip("no cuda_fp16.h for NVRTC (neither the nvidia-cuda-runtime wheel nor a "
                    "CUDA toolkit is installed)")
    try:
        prog = nvrtc.createProgram(kernels.program_source(), "numres.cu", [], [])
    except Exception as exc:  # noqa: BLE001 - the library itself is missing
        pytest.skip(f"NVRTC is not available: {exc}")
    for name in kernels.name_expressions(ctype):
        nvrtc.addNameExpression(prog, name)
    # exactly the backend's options (common.cuh is in the text; cuda_fp16.h's folder is
    # named by compile_options), for the H200's architecture
    options = ["-std=c++17", "-arch=compute_90", *kernels.compile_options(ctype)]
    try:
        nvrtc.compileProgram(prog, options)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"NVRTC: {exc}\n{nvrtc.getProgramLog(prog)}")
    assert all(nvrtc.getLoweredName(prog, name) for name in kernels.name_expressions(ctype))


def test_every_kernel_is_instantiated_for_both_types():
    """The backend asks NVRTC for exactly these names; each is instantiated explicitly."""
    text = kernels.program_source()
    for ctype in ("float", "__half"):
        for name in kernels.name_expressions(ctype):
            assert f"template __global__ void {name}(" in text, name


def test_the_program_text_carries_common_cuh(monkeypatch):
    """Defect 6: CuPy's compile cache is keyed on the text, and the header was #included:
    an edited common.cuh was not recompiled. Now its text is in the program."""
    text = kernels.program_source()
    assert not re.search(r'^\s*#\s*include\s+"common\.cuh"', text, re.M)
    assert "typedef long long index_t;" in text
    original = kernels.kernel_source
    monkeypatch.setattr(kernels, "kernel_source", lambda name: original(name) + (
        "\n// edited\n" if name == kernels.HEADER else ""))
    kernels.program_source.cache_clear()
    try:
        assert kernels.program_source() != text
    finally:
        kernels.program_source.cache_clear()


@pytest.mark.slow
def test_wheel_ships_the_kernels(tmp_path):
    # from a clean copy: a checkout's own build/ folder may hold files that are gone
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                           str(tmp_path), str(src)], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0 and "No matching distribution" in done.stderr:
        pytest.skip("setuptools could not be fetched for the build")
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("numres-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for source in kernels.SOURCES + (kernels.HEADER, "__init__.py"):
        assert f"numres/kernels/{source}" in names
    for module in ("__init__", "backend", "blas", "graphs", "kernels"):
        assert f"numres/backends/cupy/{module}.py" in names
    assert "numres/hub/imagenet_categories.txt" in names
    assert not any("bench_gpu" in name for name in names)    # no torch ResNet in the wheel


@pytest.mark.skipif(real_cupy_has_a_gpu(), reason="a GPU is present; this checks the fallback")
def test_without_a_gpu_the_error_says_what_to_install():
    with pytest.raises(BackendUnavailable, match=r"pip install numres\[cuda\]"):
        get_backend("cupy")
    with pytest.raises(BackendUnavailable, match="cupy"):
        numres.resnet18(backend="cupy")
    assert get_backend("auto").name in ("numba", "numpy")
    assert "cupy" not in numres.available_backends()


def test_cuda_tests_collect_without_numba():
    """Defect 7: this file imported test_ops, which skips as a whole without Numba, so the
    CUDA tests did not even collect there. Run the collection with Numba made unimportable."""
    plugin = ROOT / "tests" / "backends" / "cupy_standin" / "no_numba.py"
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "tests.backends.cupy_standin.no_numba",
                           "tests/backends/test_cupy.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert plugin.is_file()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "test_conv2d_matches_definition" in done.stdout


# -- ops against the NumPy oracle --------------------------------------------------------------
PRECISION = {"float32": 1e-4, "float16": 1e-2}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv2d_matches_definition(cuda, rng, case, dtype):
    """Every convolution path (1x1 GEMM, im2col + GEMM, direct grouped) with its fused
    epilogue, from NumPy input (defect 1: NumPy arrays went to the kernels as they were)."""
    if dtype == "float16":
        cuda.require_half()
    n, c, h, w, o, k, s, p, g = case
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = (rng.standard_normal((o, c // g, k, k)) / np.sqrt(c // g * k * k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    expected = reference_conv(x, wt, b, s, p, g)
    res = rng.standard_normal(expected.shape).astype(np.float32)
    be = cuda.backend(dtype=dtype, cuda_graph=False)
    got = run_conv(be, x, wt, b, s, p, g)
    scale = max(1.0, np.abs(expected).max())
    assert np.abs(got - expected).max() <= PRECISION[dtype] * scale
    fused = run_conv(be, x, wt, b, s, p, g, relu=True, residual=res)
    expected = np.maximum(expected + res, 0)
    assert np.abs(fused - expected).max() <= PRECISION[dtype] * scale
    assert (fused >= 0).all()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_pooling_batch_norm_linear(cuda, rng, dtype):
    if dtype == "float16":
        cuda.require_half()
    be = cuda.backend(dtype=dtype, cuda_graph=False)
    tol = PRECISION[dtype]
    x = rng.standard_normal((2, 5, 9, 8)).astype(np.float32)
    x[0, 0] = -3e4                               # padding must never win over real values
    x[1, 1, 4, 4] = np.nan                       # NaN propagates, as in torch
    got = be.to_numpy(be.to_nchw(be.max_pool2d(be.from_nchw(x), 3, 2, 1)))
    expected = ORACLE.max_pool2d(x.astype(dtype).astype(np.float32), 3, 2, 1)
    np.testing.assert_array_equal(got, expected)
    x = rng.standard_normal((2, 6, 5, 4)).astype(np.float32)
    stats = [rng.standard_normal(6), rng.random(6) + 0.1, rng.standard_normal(6),
             rng.standard_normal(6)]
    bn_ref = ORACLE.prepare_batch_norm(*(a.astype(np.float32) for a in stats), 1e-5)
    bn = be.prepare_batch_norm(*(a.astype(np.float32) for a in stats), 1e-5)
    got = be.to_numpy(be.to_nchw(be.batch_norm(be.from_nchw(x), bn, relu=True)))
    np.testing.assert_allclose(got, ORACLE.batch_norm(x, bn_ref, relu=True), rtol=tol,
                               atol=tol)
    pooled = be.global_avg_pool(be.from_nchw(x))
    np.testing.assert_allclose(be.to_numpy(pooled), x.mean(axis=(2, 3)), rtol=tol, atol=tol)
    w, b = (rng.standard_normal((3, 6)).astype(np.float32),
            rng.standard_normal(3).astype(np.float32))
    out = be.to_numpy(be.linear(pooled, be.prepare_linear(w, b)))
    np.testing.assert_allclose(out, x.mean(axis=(2, 3)) @ w.T + b, rtol=tol, atol=tol)


# -- whole models ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(numres.ARCHS))
def test_every_builder_equals_numpy_in_float32_and_float16(cuda, arch):
    """Seeded weights with random batch-norm statistics (a lost bias or a wrong folding
    shows); graph replay and eager passes; NumPy in and CuPy in. Float16 is held to the bound
    measured on the emulator with a margin (README, "GPU (CuPy)")."""
    precisions = ["float32", "float16"] if cuda.has_half() else ["float32"]
    sd = bench_gpu.seeded_state_dict(arch, num_classes=10)
    shape = (2, 3, 32, 32)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    reference = numres.build(arch, weights=sd, num_classes=10, backend="numpy")(x)
    for precision in precisions:
        row = bench_gpu.measure(arch, precision, shape, cuda.cupy, num_classes=10,
                                state_dict=sd, reference=reference)
        assert row["passed"], row
        if cuda.standin is not None:         # the same kernels and GEMMs: bit for bit
            assert row["replay_vs_eager"] == 0 and row["device_vs_host"] == 0, row


def test_tf32_is_within_its_bound(cuda):
    """TF32 products: inputs rounded to 10 mantissa bits (the emulator rounds them as the
    tensor cores' conversion does; it cannot reproduce their summation order)."""
    for arch in ("resnet18", "resnext50_32x4d"):
        row = bench_gpu.measure(arch, "tf32", (2, 3, 32, 32), cuda.cupy, num_classes=10)
        assert row["passed"], row
        assert row["rel"] > 1e-6           # TF32 really was used


def test_features_and_feature_maps(cuda, rng):
    sd = bench_gpu.seeded_state_dict("resnet50", num_classes=10)
    ref = numres.build("resnet50", weights=sd, num_classes=10, backend="numpy")
    gpu = numres.build("resnet50", weights=sd, num_classes=10, backend=cuda.backend())
    x = rng.standard_normal((1, 3, 97, 131)).astype(np.float32)   # odd size
    np.testing.assert_allclose(gpu.features(x), ref.features(x), rtol=1e-4, atol=1e-4)
    maps, expected = gpu.feature_maps(x, ("stem", "layer2")), ref.feature_maps(
        x, ("stem", "layer2"))
    for stage in expected:
        np.testing.assert_allclose(maps[stage], expected[stage], rtol=1e-4, atol=1e-4)
    on_device = gpu.feature_maps(cuda.cupy.asarray(x), ("layer2",))["layer2"]
    assert isinstance(on_device, cuda.cupy.ndarray)


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graphs", "eager"])
def test_two_threads_share_one_model(cuda, rng, cuda_graph):
    sd = bench_gpu.seeded_state_dict("resnet18", num_classes=7)
    model = numres.build("resnet18", weights=sd, num_classes=7,
                         backend=cuda.backend(cuda_graph=cuda_graph))
    inputs = [rng.standard_normal((2, 3, 32, 32 + 8 * i)).astype(np.float32) for i in (0, 1)]
    assert calls_from_two_threads_differ(model, inputs, rounds=3) == []


def test_memory_estimate_bounds_what_the_device_holds(cuda):
    """numres.models.memory's estimate of a pass against the emulated device's own peak."""
    standin = emulator_only(cuda)
    for cuda_graph in (False, True):
        model = numres.build("resnet50", num_classes=10,
                             backend=cuda.backend(cuda_graph=cuda_graph))
        model._prepared()
        shape = (2, 3, 64, 48)
        x = np.zeros(shape, np.float32)
        gc.collect()              # no garbage of earlier tests freed during the pass
        base = standin.device.peak_bytes = standin.device.used_bytes
        model(x)
        used = standin.device.peak_bytes - base
        estimate = memory.estimate_peak_bytes(model, shape)
        assert used <= estimate <= used + (80 << 20), (cuda_graph, used, estimate)


# -- defect 2 and 3: CUDA graphs ---------------------------------------------------------------
def test_graph_capture_really_captures(cuda):
    """Defect 2: every cuBLAS call through CuPy raised during capture, and the fallback to
    eager was silent. Now the pass is captured and replayed, and equals an eager pass."""
    sd = bench_gpu.seeded_state_dict("resnet18", num_classes=10)
    graph = numres.build("resnet18", weights=sd, num_classes=10, backend=cuda.backend())
    eager = numres.build("resnet18", weights=sd, num_classes=10,
                         backend=cuda.backend(cuda_graph=False))
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a failed capture warns
        for _ in range(3):                      # replays with new inputs, same shape
            x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
            replayed, plain = graph(x), eager(x)
            if cuda.standin is not None:        # the same kernels and GEMMs: bit for bit
                np.testing.assert_array_equal(replayed, plain)
            else:
                np.testing.assert_allclose(replayed, plain, rtol=1e-5, atol=1e-5)
    assert bench_gpu._graph_captured(graph)
    if cuda.standin is not None:
        assert cuda.standin.device.graph_launches == 3
        calls = cuda.standin.cublaslt.calls
        assert any(call["capturing"] for call in calls)


def test_capture_waits_for_the_input_and_allocates_nothing(cuda):
    """Defect 3: the input copy was made on the caller's stream and read by the capture
    stream without waiting for it; and memory allocated from the pool during the capture
    went back to it while the graph kept its address. The stand-in refuses both (a race, an
    allocation during capture); here the input is made on the caller's stream just before
    the call, with no host synchronisation."""
    standin = emulator_only(cuda)
    cupy = cuda.cupy
    model = numres.build("resnet18", num_classes=10, backend=cuda.backend())
    log = standin.device.allocation_log = []
    x = cupy.asarray(np.ones((2, 3, 32, 32), np.float32))
    out = model(x)
    assert bench_gpu._graph_captured(model)
    assert isinstance(out, cupy.ndarray) and out.shape == (2, 10)
    standin.device.allocation_log = None
    assert log                          # allocations happened, none during the capture
    assert standin.device.violations == []


def test_a_failed_capture_pins_nothing(cuda, monkeypatch):
    """Defect 3: when end_capture raised, the workspace's tracking was never stopped, and
    every later buffer stayed referenced (each pass allocated anew). Provoke a capture
    that CUDA invalidates (a host synchronisation inside it), then run passes: nothing may
    grow after the first."""
    standin = emulator_only(cuda)
    be = cuda.backend()
    model = numres.build("resnet18", num_classes=10, backend=be)
    real = be.from_nchw
    state = {"syncs": 0}

    def sync_inside(x):
        stream = cuda.cupy.cuda.get_current_stream()
        if stream.is_capturing():
            state["syncs"] += 1
            try:
                stream.synchronize()          # illegal: invalidates the capture
            except Exception:  # noqa: BLE001 - swallowed, as careless code would
                pass
        return real(x)

    monkeypatch.setattr(be, "from_nchw", sync_inside)
    x = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        model(x)
    standin.expected_violations = 1               # the synchronisation, on purpose
    assert state["syncs"] == 1
    used = []
    for _ in range(4):
        model(x)
        gc.collect()              # earlier tests' garbage may be freed at any moment
        used.append(standin.device.used_bytes)
    assert max(used) <= used[0], used             # growth was the defect; shrinking is not


def test_captured_shapes_are_bounded(cuda):
    """Defect 3: every input shape kept a captured graph and its buffers for good. Now at
    most ``max_graphs`` per model, least recently used evicted, and memory stays flat."""
    be = cuda.backend()                          # at most max_graphs=2 shapes by default
    model = numres.build("resnet18", num_classes=10, backend=be)
    shapes = [(1, 3, 32, 32 + 8 * i) for i in range(5)]
    for shape in shapes:
        model(np.zeros(shape, np.float32))
    graphs = model._prepared()["graphs"]
    captured = [k for k, v in graphs.items() if not isinstance(v, str)]
    assert len(captured) == 2
    assert [k[2] for k in captured] == shapes[-2:]
    if cuda.standin is not None:
        device = cuda.standin.device
        before = device.used_bytes
        for shape in shapes:            # all of them again: evicted ones are re-captured
            model(np.zeros(shape, np.float32))
        assert device.used_bytes <= before * 1.05


# -- defect 4: float16 grouped convolutions ----------------------------------------------------
def test_float16_grouped_convolution_stays_in_half_precision(cuda, rng):
    """Defect 4: a 3-D cupy.matmul made float32 copies of the im2col matrix, the weights and
    the result (3.7 GB per layer at batch 256). Now the grouped convolution reads half,
    sums in float32 and writes half straight into its output: the only new device memory is
    the output itself."""
    cuda.require_half()
    standin = emulator_only(cuda)
    be = cuda.backend(dtype="float16", cuda_graph=False)
    x = rng.standard_normal((2, 128, 14, 14)).astype(np.float32)
    wt = (rng.standard_normal((128, 4, 3, 3)) / 6).astype(np.float32)
    b = rng.standard_normal(128).astype(np.float32)
    conv = be.prepare_conv(wt, b, 1, 1, 32)
    act = be.from_nchw(cuda.cupy.asarray(x))
    be.conv2d(act, conv)                          # the workspace has its buffers now
    log = standin.device.allocation_log = []
    y = be.conv2d(act, conv)
    standin.device.allocation_log = None
    assert y.dtype == np.float16
    assert sum(size for size, _ in log) <= y.nbytes
    got = be.to_numpy(be.to_nchw(y))
    expected = reference_conv(x.astype(np.float16).astype(np.float32),
                              wt.astype(np.float16).astype(np.float32),
                              b.astype(np.float16).astype(np.float32), 1, 1, 32)
    # float32 sums of exactly widened halves, one rounding: half an ulp of float16
    assert np.all(np.abs(got - expected) <= np.abs(expected) * 2 ** -10 + 1e-4)


# -- defect 5: im2col, the epilogue, K alignment -----------------------------------------------
def test_gemms_are_8_aligned_and_fuse_their_epilogue(cuda):
    """Defect 5: the epilogue (bias, residual, ReLU) was a separate pass over every output,
    and float16 GEMMs with K = 147 (stem) were not 8-aligned. Now every GEMM's K is a
    multiple of 8 and bias/residual/ReLU happen in cuBLASLt's epilogue."""
    standin = emulator_only(cuda)
    model = numres.build("resnet50", num_classes=10, backend=cuda.backend(cuda_graph=False))
    model(np.zeros((1, 3, 32, 32), np.float32))
    stats = standin.runtime.stats
    calls = standin.cublaslt.calls
    ks = [call["k"] for call in calls] + stats["matmul_k"]     # cuBLASLt's, cupy.matmul's
    assert ks and all(k % 8 == 0 for k in ks), sorted(set(ks))
    assert 152 in ks                                           # the stem: 147 -> 152
    assert stats["kernels"]["bias_act<float>"] == 0            # no separate epilogue pass
    assert all(call["epilogue"] in (4, 6) for call in calls)   # BIAS or RELU_BIAS
    assert sum(call["residual"] for call in calls) == 16       # each block's last conv
    # one im2col per 3x3 (16) and strided 1x1 (3) convolution, and the stem's
    assert stats["kernels"]["im2col_nhwc<float, 4>"] + stats["kernels"][
        "im2col_nhwc<float, 1>"] == 16 + 3 + 1


def test_epilogue_falls_back_when_cublaslt_cannot_fuse_it(cuda):
    standin = emulator_only(cuda)
    standin.cublaslt.refuse_fused_epilogues = True
    sd = bench_gpu.seeded_state_dict("resnet18", num_classes=10)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    expected = numres.build("resnet18", weights=sd, num_classes=10, backend="numpy")(x)
    got = numres.build("resnet18", weights=sd, num_classes=10, backend=cuda.backend())(x)
    assert np.abs(got - expected).max() <= 1e-4 * max(1, np.abs(expected).max())
    assert all(call["epilogue"] == 1 for call in standin.cublaslt.calls)


# -- defect 6: per-launch costs, results, TF32, the lock ---------------------------------------
def test_kernels_are_compiled_once_per_dtype_and_never_looked_up_again(cuda):
    """Defect 6: every launch made a new RawKernel (``module.get_function``)."""
    standin = emulator_only(cuda)
    stats = standin.runtime.stats
    model = numres.build("resnet18", num_classes=10, backend=cuda.backend(cuda_graph=False))
    x = np.zeros((1, 3, 32, 32), np.float32)
    model(x)
    after_first = dict(stats)
    for _ in range(3):
        model(x)
    assert stats["modules"] == after_first["modules"] == 1
    assert stats["functions"] == after_first["functions"] == len(
        kernels.name_expressions("float"))
    assert stats["launches"] > after_first["launches"]


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graphs", "eager"])
def test_results_are_copies_that_pin_no_workspace(cuda, cuda_graph):
    """Defect 6: results were views of workspace buffers, and a result kept pinned its
    buffer (the next pass allocated a new one)."""
    cupy = cuda.cupy
    be = cuda.backend(cuda_graph=cuda_graph)
    model = numres.build("resnet18", num_classes=10, backend=be)
    x = cupy.asarray(np.zeros((1, 3, 32, 32), np.float32))
    kept = [model(x) for _ in range(2)]
    assert all(out.base is None for out in kept)
    allocations = be.workspace_allocations
    kept += [model(x) for _ in range(4)]
    assert be.workspace_allocations == allocations


def test_tf32_leaves_cupys_cublas_handle_alone(cuda):
    """Defect 6: a tf32=True backend left CuPy's shared cuBLAS handle in TF32 mode for every
    other CuPy user in the process."""
    standin = emulator_only(cuda)
    handles = standin.modules["cupy"].cuda.device
    cublas = standin.modules["cupy_backends.cuda.libs.cublas"]
    model = numres.build("resnet18", num_classes=10, backend=cuda.backend(tf32=True))
    model(np.zeros((1, 3, 32, 32), np.float32))
    assert cublas.getMathMode(handles.get_cublas_handle()) == cublas.CUBLAS_DEFAULT_MATH
    assert {call["compute"] for call in standin.cublaslt.calls} == {77}   # FAST_TF32, ours


def test_eager_passes_do_not_wait_for_each_other(cuda, monkeypatch):
    """Defect 6: one lock was held around every eager pass of a backend with graphs on (a
    shape that could not be captured), so two threads' passes ran one after the other. The
    capture is made to fail here; thread A then stops inside its pass until thread B has run
    a whole pass."""
    standin = emulator_only(cuda)

    def refuse(self, mode=None):
        raise standin.modules["cupy"].cuda.runtime.CUDARuntimeError("capture refused (test)")

    monkeypatch.setattr(standin.cupy.cuda.Stream, "begin_capture", refuse)
    be = cuda.backend()
    model = numres.build("resnet18", num_classes=10, backend=be)
    x = np.zeros((1, 3, 32, 32), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the capture failure's warning
        model(x)
    inside, done = threading.Event(), threading.Event()
    waited = {}
    real = be.global_avg_pool

    def held(act):
        if threading.current_thread().name == "A":
            inside.set()
            # set as soon as B's pass ends; the bound only ends a broken (serialised) run
            waited["until_b_finished"] = done.wait(120)
        return real(act)

    monkeypatch.setattr(be, "global_avg_pool", held)
    a = threading.Thread(target=model, args=(x,), name="A")
    a.start()
    assert inside.wait(120)
    model(x)                         # B: must not wait for A's pass to end
    done.set()
    a.join()
    assert waited["until_b_finished"]


# -- the stand-in's strictness, on today's numres ----------------------------------------------
def test_numpy_arrays_are_refused_as_kernel_arguments(cuda):
    """The rule behind defect 1: CuPy refuses a NumPy array of more than one element as a
    kernel argument (a device pointer is needed)."""
    emulator_only(cuda)
    from numres.backends.cupy import backend
    fn = backend.KERNELS.get("nchw_to_nhwc<float>", "float")
    out = cuda.cupy.empty((1, 2, 2, 3), np.float32)
    with pytest.raises(TypeError, match="numpy.ndarray of shape"):
        fn((1,), (256,), (np.zeros((1, 3, 2, 2), np.float32), out, np.int64(1), np.int32(3),
                          np.int32(2), np.int32(2)))
    cuda.standin.expected_violations = 1


# -- the GPU check script ----------------------------------------------------------------------
def test_gpu_check_script_parses_checks_and_writes_json(cuda, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    half = cuda.has_half()                  # the benchmark times float16 too
    precisions = ["float32", "float16"] if half else ["float32"]
    rc = bench_gpu.main(["--check-archs", "resnet18", "--precisions", ",".join(precisions),
                         "--models", "resnet18", "--batches", "1", "--size", "32",
                         "--rounds", "1", "--no-torch", "--json", str(out)]
                        + ([] if half else ["--no-bench"]), check_sizes={"resnet18": (32, 32)})
    assert rc == 0
    import json
    report = json.loads(out.read_text())
    assert [row["precision"] for row in report["checks"]] == precisions
    assert all(row["passed"] and row["captured"] for row in report["checks"])
    if half:
        contenders = [row["contender"] for row in report["bench"]]
        assert contenders == ["numres-cupy fp32", "numres-cupy fp16"]
        assert all(row["img_s"] > 0 and row["peak_mib"] >= 0 for row in report["bench"])
    text = capsys.readouterr().out
    assert "PASS resnet18" in text and "graph captured: True" in text
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--precisions", "bfloat16"])
    budget = []
    bench_gpu.bench(["resnet18"], [1, 2], 1, budget, cuda.cupy, size=32, budget_s=0)
    assert budget == [{"model": "resnet18", "batch": 1, "skipped": "budget"},
                      {"model": "resnet18", "batch": 2, "skipped": "budget"}]


def test_seeded_weights_exercise_bias_and_folding():
    """Defect 7: the GPU model test used unseeded weights and identity batch norm, under
    which a lost bias or a wrong folding changes nothing."""
    sd = bench_gpu.seeded_state_dict("resnet18", seed=3)
    assert np.array_equal(sd["layer1.0.bn1.running_mean"],
                          bench_gpu.seeded_state_dict("resnet18", seed=3)[
                              "layer1.0.bn1.running_mean"])
    for name in ("bn1.running_mean", "bn1.bias", "layer4.1.bn2.bias"):
        assert np.abs(sd[name]).min() > 0, name
    assert not np.allclose(sd["bn1.running_var"], 1) and not np.allclose(sd["bn1.weight"], 1)
    folded = numres.build("resnet18", weights=sd, backend="numpy")
    unfolded = numres.build("resnet18", weights=sd, backend="numpy", fold_bn=False)
    identity = dict(sd, **{k: np.zeros_like(v) for k, v in sd.items() if k.endswith(".bias")
                           and not k.startswith("fc")})
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(folded(x), unfolded(x), rtol=1e-4, atol=1e-4)
    lost_bias = numres.build("resnet18", weights=identity, backend="numpy")(x)
    assert np.abs(lost_bias - folded(x)).max() > 1e-2
