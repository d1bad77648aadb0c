"""numres's own cuBLASLt handle: GEMMs with the convolution epilogue fused, graph-capturable.

Why not ``cupy.matmul``: every cuBLAS wrapper of CuPy 13-14 calls ``cublasSetStream`` first,
which raises ``NotImplementedError`` while the stream is capturing
(``cupy_backends/cuda/libs/cublas.pyx``), so no forward pass could be captured into a CUDA
graph; CuPy's handle is shared by the whole process (a math mode set on it leaks into every
other user); and a 3-D float16 product runs in float32 on float32 copies of its operands.
cuBLASLt takes the stream with each call (the handle holds no stream), takes its workspace
from the caller (nothing is allocated while capturing), computes float16 products with float32
accumulation, and applies bias, residual and ReLU in the GEMM's epilogue.

Layout: numres's matrices are row-major, cuBLAS's column-major, and a row-major (R, C) array is
the column-major (C, R) matrix with leading dimension C. So ``y = x @ w`` with row-major
``x`` (N, K) (rows ``ldx`` apart), ``w`` (K, M) and ``y`` (N, M) is, for cuBLASLt,
``D = A B`` with A = ``w`` as (M x K, ld M), B = ``x`` as (K x N, ld ldx), D = ``y`` as
(M x N, ld M): no transposes, and the bias (one value per output channel) runs along D's rows,
where the BIAS epilogue puts it. A residual is C (beta = 1, C and D laid out alike).

The C entry points are bound from the library's addresses with the prototypes of
``cublasLt.h``; the tests bind an emulation of the same entry points the same way.
"""

import collections
import ctypes
import ctypes.util
import threading

import numpy as np

from .kernels import cuda_files

# cublasStatus_t
STATUS = {0: "CUBLAS_STATUS_SUCCESS", 1: "CUBLAS_STATUS_NOT_INITIALIZED",
          3: "CUBLAS_STATUS_ALLOC_FAILED", 7: "CUBLAS_STATUS_INVALID_VALUE",
          8: "CUBLAS_STATUS_ARCH_MISMATCH", 11: "CUBLAS_STATUS_MAPPING_ERROR",
          13: "CUBLAS_STATUS_EXECUTION_FAILED", 14: "CUBLAS_STATUS_INTERNAL_ERROR",
          15: "CUBLAS_STATUS_NOT_SUPPORTED", 16: "CUBLAS_STATUS_LICENSE_ERROR"}
NOT_SUPPORTED = 15
# cudaDataType_t, cublasComputeType_t
CUDA_R_32F, CUDA_R_16F = 0, 2
DATA_TYPES = {np.dtype(np.float32): CUDA_R_32F, np.dtype(np.float16): CUDA_R_16F}
COMPUTE_32F, COMPUTE_32F_FAST_TF32 = 68, 77
# cublasLtMatmulDescAttributes_t (sizes are part of the API: a wrong one is INVALID_VALUE)
DESC_EPILOGUE, DESC_BIAS_POINTER = 7, 8
# cublasLtEpilogue_t
EPILOGUE_DEFAULT, EPILOGUE_RELU, EPILOGUE_BIAS, EPILOGUE_RELU_BIAS = 1, 2, 4, 6
# cublasLtMatmulPreferenceAttributes_t
PREF_MAX_WORKSPACE_BYTES = 1
PREF_MIN_ALIGNMENT = {"A": 5, "B": 6, "C": 7, "D": 8}
#: Workspace handed to every GEMM of one stream (NVIDIA recommends 32 MiB on Hopper).
WORKSPACE_BYTES = 32 << 20


class HeuristicResult(ctypes.Structure):
    """``cublasLtMatmulHeuristicResult_t``."""
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspaceSize", ctypes.c_size_t),
                ("state", ctypes.c_int), ("wavesCount", ctypes.c_float),
                ("reserved", ctypes.c_int * 4)]


_P = ctypes.c_void_p
PROTOTYPES = {
    "cublasLtCreate": [_P],
    "cublasLtDestroy": [_P],
    "cublasLtMatmulDescCreate": [_P, ctypes.c_int, ctypes.c_int],
    "cublasLtMatmulDescDestroy": [_P],
    "cublasLtMatmulDescSetAttribute": [_P, ctypes.c_int, _P, ctypes.c_size_t],
    "cublasLtMatrixLayoutCreate": [_P, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64,
                                   ctypes.c_int64],
    "cublasLtMatrixLayoutDestroy": [_P],
    "cublasLtMatmulPreferenceCreate": [_P],
    "cublasLtMatmulPreferenceDestroy": [_P],
    "cublasLtMatmulPreferenceSetAttribute": [_P, ctypes.c_int, _P, ctypes.c_size_t],
    "cublasLtMatmulAlgoGetHeuristic": [_P, _P, _P, _P, _P, _P, _P, ctypes.c_int, _P, _P],
    "cublasLtMatmul": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                       ctypes.c_size_t, _P],
}


class CublasError(RuntimeError):
    """A cuBLASLt call returned an error status."""

    def __init__(self, function, status):
        super().__init__(f"{function} failed: {STATUS.get(status, status)}")
        self.function, self.status = function, status


def library_candidates(cuda_major):
    """Where ``libcublasLt.so.<major>`` may be: the ``nvidia-cublas`` wheel (CUDA 13:
    ``nvidia/cu13/lib``; CUDA 12: ``nvidia/cublas/lib``), a toolkit's ``lib64``, then the
    loader's own search path."""
    name = f"libcublasLt.so.{cuda_major}"
    found = ctypes.util.find_library("cublasLt")
    return [str(p) for p in cuda_files(name, (f"cu{cuda_major}/lib", "cublas/lib"), "lib64")] \
        + [name] + ([found] if found else [])


def open_cublaslt(cuda_major):
    """The cuBLASLt shared library matching CUDA ``cuda_major``.

    Raises:
        OSError: not found (the message lists where it looked).
    """
    tried = []
    for candidate in library_candidates(cuda_major):
        try:
            return ctypes.CDLL(candidate)
        except OSError as exc:
            tried.append(f"{candidate} ({exc})")
    raise OSError("cuBLASLt was not found: " + "; ".join(tried))


class Plan:
    """Descriptors and algorithm of one GEMM problem; ``fused`` tells whether the epilogue
    (bias, residual, ReLU) is done by the GEMM."""

    def __init__(self, desc_factory, layouts, algo, workspace, fused):
        self.desc_factory, self.layouts, self.algo = desc_factory, layouts, algo
        self.workspace, self.fused = workspace, fused
        self.descs = collections.OrderedDict()     # bias pointer -> matmul descriptor


class CublasLt:
    """One cuBLASLt library: a handle per thread, GEMM plans cached per problem.

    Args:
        lib: the loaded library (``open_cublaslt``), or anything with the same entry points.
    """

    #: Matmul descriptors kept per plan (one per bias vector, i.e. per layer).
    MAX_DESCS = 4096

    def __init__(self, lib):
        self._fn = {}
        for name, argtypes in PROTOTYPES.items():
            address = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
            self._fn[name] = ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(address)
        self._lib = lib                      # keeps the library (or emulation) alive
        self._local = threading.local()
        self._plans = {}
        self._lock = threading.Lock()
        self._alpha, self._one, self._zero = (ctypes.c_float(1.0), ctypes.c_float(1.0),
                                              ctypes.c_float(0.0))
        #: GEMM problems whose fused epilogue cuBLASLt refused, and how (the GPU check
        #: reports them: each costs a separate epilogue pass)
        self.unfused = []

    def _call(self, name, *args, allow=()):
        status = self._fn[name](*args)
        if status != 0 and status not in allow:
            raise CublasError(name, status)
        return status

    def _handle(self):
        handle = getattr(self._local, "handle", None)
        if handle is None:
            out = ctypes.c_void_p()
            self._call("cublasLtCreate", ctypes.byref(out))
            handle = self._local.handle = out.value
        return handle

    def gemm(self, stream, workspace, w, x, y, *, m, n, k, ldx, dtype, tf32=False, bias=None,
             residual=None, relu=False):
        """``y = relu?(x @ w + bias + residual)`` on ``stream``, row-major, in ``dtype``.

        Args:
            stream: the ``cudaStream_t`` (an int; 0 is the legacy stream).
            workspace: ``(address, bytes)`` of device memory only this stream uses.
            w, x, y, bias, residual: device addresses: ``w`` (k, m), ``x`` (n, k) with rows
                ``ldx`` elements apart, ``y`` and ``residual`` (n, m), ``bias`` (m,).
            m, n, k: output channels, rows (pixels), reduction length.
            dtype: ``float32`` or ``float16`` (all operands); float32 accumulation.
            tf32: let float32 products use TF32 tensor cores (this GEMM only).

        Returns:
            True if the epilogue was applied; False if cuBLASLt has no algorithm that fuses
            it here: ``y`` is then the bare product, and the caller applies bias, residual
            and ReLU itself.

        Raises:
            CublasError: a call failed (including: no algorithm at all for the problem).
        """
        dtype = np.dtype(dtype)
        compute = COMPUTE_32F_FAST_TF32 if tf32 and dtype == np.float32 else COMPUTE_32F
        pointers = {"A": w, "B": x, "C": y if residual is None else residual, "D": y}
        align = {name: _alignment(ptr) for name, ptr in pointers.items()}
        epilogue = (EPILOGUE_RELU_BIAS if relu else EPILOGUE_BIAS) if bias is not None else \
            (EPILOGUE_RELU if relu else EPILOGUE_DEFAULT)
        key = (m, n, k, ldx, dtype.str, compute, epilogue, residual is not None,
               tuple(sorted(align.items())), _alignment(bias) if bias is not None else 0,
               workspace[1])
        plan = self._plans.get(key)
        if plan is None:
            with self._lock:
                plan = self._plans.get(key) or self._plan(key, bias)
                self._plans[key] = plan
        if plan.fused:
            epilogue_bias = bias
            beta = self._one if residual is not None else self._zero
        else:
            epilogue_bias, beta = None, self._zero
            pointers["C"] = y
        desc = self._desc(plan, epilogue_bias)
        a_desc, b_desc, d_desc = plan.layouts
        self._call("cublasLtMatmul", self._handle(), desc, ctypes.byref(self._alpha),
                   pointers["A"], a_desc, pointers["B"], b_desc, ctypes.byref(beta),
                   pointers["C"], d_desc, pointers["D"], d_desc, ctypes.byref(plan.algo.algo),
                   workspace[0], workspace[1], stream)
        return plan.fused

    def _plan(self, key, bias):
        (m, n, k, ldx, dtype, compute, epilogue, has_residual, align, bias_align,
         workspace) = key
        data_type = DATA_TYPES[np.dtype(dtype)]
        layouts = tuple(self._layout(data_type, rows, cols, ld)
                        for rows, cols, ld in ((m, k, m), (k, n, ldx), (m, n, m)))
        preference = ctypes.c_void_p()
        self._call("cublasLtMatmulPreferenceCreate", ctypes.byref(preference))
        try:
            self._set(preference, "cublasLtMatmulPreferenceSetAttribute",
                      PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(workspace))
            for name, value in dict(align).items():
                self._set(preference, "cublasLtMatmulPreferenceSetAttribute",
                          PREF_MIN_ALIGNMENT[name], ctypes.c_uint32(value))
            # The epilogue fused (the residual is C, beta = 1) first; where cuBLASLt has no
            # algorithm for that, the plain GEMM, and the caller applies the epilogue.
            attempts = [(epilogue, True)]
            if epilogue != EPILOGUE_DEFAULT or has_residual:
                attempts.append((EPILOGUE_DEFAULT, False))
            for attempt, fused in attempts:
                def factory(bias_ptr, e=attempt):
                    return self._new_desc(compute, e, bias_ptr)

                desc = factory(bias if attempt & EPILOGUE_BIAS else None)
                last = attempt == attempts[-1][0]
                try:
                    result = HeuristicResult()
                    count = ctypes.c_int(0)
                    # a fused epilogue may be refused in any way; the plain GEMM may not
                    status = self._call("cublasLtMatmulAlgoGetHeuristic", self._handle(),
                                        desc, layouts[0], layouts[1], layouts[2], layouts[2],
                                        preference, 1, ctypes.byref(result),
                                        ctypes.byref(count),
                                        allow=(NOT_SUPPORTED,) if last else tuple(STATUS))
                finally:
                    self._call("cublasLtMatmulDescDestroy", desc)
                if status == 0 and count.value > 0:
                    return Plan(factory, layouts, result, workspace, fused)
                self.unfused.append((key, STATUS.get(status, status)))
            raise CublasError("cublasLtMatmulAlgoGetHeuristic", NOT_SUPPORTED)
        finally:
            self._call("cublasLtMatmulPreferenceDestroy", preference)

    def _layout(self, data_type, rows, cols, ld):
        out = ctypes.c_void_p()
        self._call("cublasLtMatrixLayoutCreate", ctypes.byref(out), data_type, rows, cols, ld)
        return out.value

    def _new_desc(self, compute, epilogue, bias_ptr):
        desc = ctypes.c_void_p()
        self._call("cublasLtMatmulDescCreate", ctypes.byref(desc), compute, CUDA_R_32F)
        self._set(desc.value, "cublasLtMatmulDescSetAttribute", DESC_EPILOGUE,
                  ctypes.c_uint32(epilogue))
        if epilogue & EPILOGUE_BIAS:
            self._set(desc.value, "cublasLtMatmulDescSetAttribute", DESC_BIAS_POINTER,
                      ctypes.c_void_p(bias_ptr))
        return desc.value

    def _desc(self, plan, bias):
        """The plan's matmul descriptor for this bias vector: descriptors are immutable once
        made, so threads never race on an attribute."""
        desc = plan.descs.get(bias)
        if desc is None:
            with self._lock:
                desc = plan.descs.get(bias)
                if desc is None:
                    desc = plan.descs[bias] = plan.desc_factory(bias)
                    while len(plan.descs) > self.MAX_DESCS:
                        _, old = plan.descs.popitem(last=False)
                        self._call("cublasLtMatmulDescDestroy", old)
        return desc

    def _set(self, obj, function, attr, value):
        self._call(function, obj, attr, ctypes.byref(value), ctypes.sizeof(value))


def _alignment(ptr):
    """The largest power of two dividing ``ptr``, at most 256 (what cuBLASLt asks about)."""
    ptr = int(ptr or 0)
    return 256 if ptr % 256 == 0 else ptr & -ptr
