"""The CuPy stand-in refuses what CuPy and CUDA refuse (each rule's source is in
``cupy_standin/__init__.py``), and its emulated cuBLASLt checks what the real one checks."""

import ctypes

import numpy as np
import pytest

from numres.backends.cupy import blas

from .cupy_standin import CUDARuntimeError, StandinError


@pytest.fixture
def cp(cupy_standin):
    return cupy_standin.cupy


def kernel(name="nchw_to_nhwc<float>"):
    from numres.backends.cupy import backend
    return backend.KERNELS.get(name, "float")


def to_nchw_args(x, out):
    n, h, w, c = x.shape
    return (x, out, np.int64(n), np.int32(c), np.int32(h), np.int32(w))


def layout_args(x, out):
    n, c, h, w = x.shape
    return (x, out, np.int64(n), np.int32(c), np.int32(h), np.int32(w))


# -- kernel arguments (cupy/cuda/function.pyx: _pointer) ---------------------------------------
def test_kernel_arguments_follow_cupys_rules(cupy_standin, cp):
    x = cp.asarray(np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4))
    out = cp.empty((1, 3, 4, 2), np.float32)
    kernel()((1,), (32,), layout_args(x, out))
    np.testing.assert_array_equal(out.get(), x.get().transpose(0, 2, 3, 1))
    # a NumPy array of more than one element: CuPy's TypeError, word for word
    with pytest.raises(TypeError, match="Only numpy.ndarrays of size one can be passed"):
        kernel()((1,), (32,), layout_args(x.get(), out))
    # a size-one NumPy array passes its value: an int32 one fits an int parameter
    kernel()((1,), (32,), (x, out, np.int64(1), np.array([2], np.int32), np.int32(3),
                           np.int32(4)))
    # stricter than CUDA, which would read 4 of a Python int's 8 bytes
    with pytest.raises(TypeError, match="4 bytes"):
        kernel()((1,), (32,), (x, out, np.int64(1), 2, np.int32(3), np.int32(4)))
    with pytest.raises(TypeError, match="is a pointer"):
        kernel()((1,), (32,), (x.data.ptr, out, np.int64(1), np.int32(2), np.int32(3),
                               np.int32(4)))
    with pytest.raises(TypeError, match="tuples"):
        kernel()([1], (32,), layout_args(x, out))
    cupy_standin.expected_violations = 3


def test_device_arrays_do_not_convert_to_numpy_implicitly(cp):
    """cupy/_core/core.pyx: ndarray.__array__ raises; .get() copies."""
    x = cp.asarray(np.ones(3, np.float32))
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        np.asarray(x)
    assert x.get().tolist() == [1, 1, 1]
    like = np.empty_like(x, shape=(2, 2))             # __array_function__, as CuPy does
    assert isinstance(like, cp.ndarray) and like.shape == (2, 2)
    assert x[1:].base is x and x[1:][1:].base is x    # views name the owner, as in CuPy


# -- streams and ordering ----------------------------------------------------------------------
def test_an_unordered_read_on_another_stream_is_a_race(cupy_standin, cp):
    a = cp.empty((4, 2, 2, 3), np.float32)
    out = cp.empty((4, 2, 3, 2), np.float32)
    a[...] = np.ones(a.shape, np.float32)             # written on the legacy stream
    side = cp.cuda.Stream(non_blocking=True)
    with side, pytest.raises(StandinError, match="races with an unordered write"):
        kernel()((1,), (32,), (a, out, np.int64(4), np.int32(2), np.int32(2), np.int32(3)))
    side.wait_event(cp.cuda.get_current_stream().record())
    with side:                                         # ordered now
        kernel()((1,), (32,), (a, out, np.int64(4), np.int32(2), np.int32(2), np.int32(3)))
    # write-after-read: the legacy stream overwrites what `side` read, unordered
    with pytest.raises(StandinError, match="may still read it"):
        a[...] = np.zeros(a.shape, np.float32)
    side.synchronize()                                 # the host waited: ordered again
    a[...] = np.zeros(a.shape, np.float32)
    # a blocking stream and the legacy stream order each other implicitly
    blocking = cp.cuda.Stream()
    with blocking:
        a[...] = np.ones(a.shape, np.float32)
    assert a.get().sum() == a.size
    cupy_standin.expected_violations = 2


# -- graph capture (cupy/cuda/stream.pyx, CUDA's capture rules) --------------------------------
def test_capture_rules(cupy_standin, cp):
    with pytest.raises(RuntimeError, match="legacy"):
        cp.cuda.Stream.null.begin_capture()
    s = cp.cuda.Stream(non_blocking=True)
    x = cp.asarray(np.ones((1, 2, 2, 3), np.float32))
    out = cp.empty((1, 3, 2, 2), np.float32)
    s.wait_event(cp.cuda.get_current_stream().record())
    with s:
        s.begin_capture()
        assert s.is_capturing()
        kernel("nhwc_to_nchw<float>")((1,), (32,), to_nchw_args(x, out))
        graph = s.end_capture()
    assert cupy_standin.device.graph_launches == 0 and not s.is_capturing()
    graph.launch(s)
    s.synchronize()
    assert out.get().sum() == 12                      # ran only when replayed
    # an allocation during capture: refused (stricter than CuPy: see the package docstring)
    with s:
        s.begin_capture()
        with pytest.raises(StandinError, match="allocation"):
            cp.empty(10, np.float32)
        with pytest.raises(CUDARuntimeError, match="Invalidated"):
            s.end_capture()
    # a host synchronisation during capture invalidates it (CUDA)
    with s:
        s.begin_capture()
        with pytest.raises(CUDARuntimeError, match="Unsupported"):
            s.synchronize()
        with pytest.raises(CUDARuntimeError, match="Invalidated"):
            s.end_capture()
    # waiting on an event recorded outside the capture (cudaErrorStreamCaptureIsolation)
    event = cp.cuda.get_current_stream().record()
    with s:
        s.begin_capture()
        with pytest.raises(CUDARuntimeError, match="Isolation"):
            s.wait_event(event)
        with pytest.raises(CUDARuntimeError):
            s.end_capture()
    cupy_standin.expected_violations = 3


def test_cupy_cublas_wrappers_refuse_a_capturing_stream(cupy_standin, cp):
    """CuPy 13-14's cublas.setStream (and so cupy.matmul) raise NotImplementedError during
    capture, before any CUDA call: the capture itself stays valid."""
    a = cp.asarray(np.ones((4, 8), np.float32))
    b = cp.asarray(np.ones((8, 2), np.float32))
    c = cp.empty((4, 2), np.float32)
    assert (cp.matmul(a, b).get() == 8).all()
    s = cp.cuda.Stream(non_blocking=True)
    s.wait_event(cp.cuda.get_current_stream().record())
    with s:
        s.begin_capture()
        with pytest.raises(NotImplementedError, match="cuBLAS API during stream capture"):
            cp.matmul(a, b, out=c)
        s.end_capture()                                # still valid
    cupy_standin.expected_violations = 1


def test_cupy_matmul_computes_3d_float16_in_float32_copies(cupy_standin, cp):
    """cupy/_core/_routines_linalg.pyx: a 3-D float16 product allocates float32 copies of
    both operands and of the result."""
    a = cp.asarray(np.ones((4, 16, 8), np.float16))
    b = cp.asarray(np.ones((4, 8, 2), np.float16))
    out = cp.empty((4, 16, 2), np.float16)
    log = cupy_standin.device.allocation_log = []
    cp.matmul(a, b, out=out)
    assert sorted(size for size, _ in log) == sorted([a.nbytes * 2, b.nbytes * 2,
                                                      out.nbytes * 2])


def test_a_graph_replayed_after_its_buffer_was_freed_is_refused(cupy_standin, cp):
    s = cp.cuda.Stream(non_blocking=True)
    x = cp.asarray(np.ones((1, 2, 2, 3), np.float32))
    out = cp.empty((1, 3, 2, 2), np.float32)
    s.wait_event(cp.cuda.get_current_stream().record())
    with s:
        s.begin_capture()
        kernel("nhwc_to_nchw<float>")((1,), (32,), to_nchw_args(x, out))
        graph = s.end_capture()
    del out                                            # the graph still writes there
    with pytest.raises(StandinError, match="freed device memory"):
        graph.launch(s)
    cupy_standin.expected_violations = 1


# -- the emulated cuBLASLt ---------------------------------------------------------------------
def test_cublaslt_gemm_with_fused_epilogue_matches_numpy(cupy_standin, cp, rng):
    lt = blas.CublasLt(cupy_standin.cublaslt)
    ws = cp.empty(blas.WORKSPACE_BYTES, np.uint8)
    for dtype, tol in ((np.float32, 1e-5), (np.float16, 2e-3)):
        x = rng.standard_normal((37, 24)).astype(dtype)     # (n, k)
        w = rng.standard_normal((24, 40)).astype(dtype)     # (k, m)
        bias = rng.standard_normal(40).astype(dtype)
        res = rng.standard_normal((37, 40)).astype(dtype)
        y = cp.empty((37, 40), dtype)
        # (device arrays kept in variables: a pointer alone does not keep memory alive)
        dw, dx, dbias, dres = (cp.asarray(a) for a in (w, x, bias, res))
        fused = lt.gemm(0, (ws.data.ptr, ws.nbytes), dw.data.ptr, dx.data.ptr, y.data.ptr,
                        m=40, n=37, k=24, ldx=24, dtype=dtype, bias=dbias.data.ptr,
                        residual=dres.data.ptr, relu=True)
        assert fused
        f32 = [a.astype(np.float32) for a in (x, w, bias, res)]
        expected = np.maximum(f32[0] @ f32[1] + f32[2] + f32[3], 0)
        np.testing.assert_allclose(y.get().astype(np.float32), expected, rtol=tol,
                                   atol=tol * 10)
    calls = cupy_standin.cublaslt.calls
    assert [c["epilogue"] for c in calls] == [6, 6] and all(c["residual"] for c in calls)


def test_cublaslt_refuses_what_the_library_refuses(cupy_standin, cp):
    lib = cupy_standin.cublaslt
    fn = {name: ctypes.CFUNCTYPE(ctypes.c_int, *types)(
        ctypes.cast(getattr(lib, name), ctypes.c_void_p).value)
        for name, types in blas.PROTOTYPES.items()}

    def new(name, *args):
        out = ctypes.c_void_p()
        assert fn[name](ctypes.byref(out), *args) == 0
        return out.value

    desc = new("cublasLtMatmulDescCreate", blas.COMPUTE_32F, blas.CUDA_R_32F)
    epilogue = ctypes.c_uint64(blas.EPILOGUE_BIAS)          # uint32_t attribute, 8 bytes
    assert fn["cublasLtMatmulDescSetAttribute"](desc, blas.DESC_EPILOGUE,
                                                ctypes.byref(epilogue), 8) == 7
    a = new("cublasLtMatrixLayoutCreate", blas.CUDA_R_32F, 8, 8, 8)
    b = new("cublasLtMatrixLayoutCreate", blas.CUDA_R_32F, 8, 4, 4)     # ld < rows
    d = new("cublasLtMatrixLayoutCreate", blas.CUDA_R_32F, 8, 4, 8)
    handle, pref = new("cublasLtCreate"), new("cublasLtMatmulPreferenceCreate")
    result, count = blas.HeuristicResult(), ctypes.c_int()
    args = (ctypes.byref(result), ctypes.byref(count))
    assert fn["cublasLtMatmulAlgoGetHeuristic"](handle, desc, a, b, d, d, pref, 1, *args) == 7
    good_b = new("cublasLtMatrixLayoutCreate", blas.CUDA_R_32F, 8, 4, 8)
    assert fn["cublasLtMatmulAlgoGetHeuristic"](handle, desc, a, good_b, d, d, pref, 1,
                                                *args) == 0 and count.value == 1
    one = ctypes.c_float(1)
    w, x, y = (cp.empty((8, 8), np.float32), cp.empty((4, 8), np.float32),
               cp.empty((5, 8), np.float32))
    ws = cp.empty(1 << 20, np.uint8)

    def matmul(a_ptr, b_ptr, d_ptr, workspace=ws.data.ptr, size=0, alpha=ctypes.byref(one),
               stream=0):
        return fn["cublasLtMatmul"](handle, desc, alpha, a_ptr, a, b_ptr, good_b,
                                    ctypes.byref(ctypes.c_float(0)), d_ptr, d, d_ptr, d,
                                    ctypes.byref(result.algo), workspace, size, stream)

    assert matmul(w.data.ptr, x.data.ptr, y.data.ptr) == 0
    assert matmul(w.data.ptr + 4, x.data.ptr, y.data.ptr) == 7      # misaligned A
    small = cp.empty((2, 8), np.float32)
    assert matmul(w.data.ptr, small.data.ptr, y.data.ptr) == 13     # B runs past its block
    assert matmul(w.data.ptr, x.data.ptr, y.data.ptr, alpha=w.data.ptr) == 7   # device alpha
    assert matmul(w.data.ptr, x.data.ptr, y.data.ptr, stream=0x1234) == 13     # no stream
    other = new("cublasLtMatrixLayoutCreate", blas.CUDA_R_32F, 8, 8, 8)
    assert fn["cublasLtMatmul"](handle, desc, ctypes.byref(one), w.data.ptr, a, w.data.ptr,
                                other, ctypes.byref(one), w.data.ptr, other, w.data.ptr,
                                other, ctypes.byref(result.algo), ws.data.ptr, 0, 0) == 7
    cupy_standin.expected_violations = 7
