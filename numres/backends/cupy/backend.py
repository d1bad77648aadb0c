"""The CUDA backend: NHWC activations on the GPU, cuBLASLt GEMMs, numres's own kernels.

Layout and strategy follow the Numba backend: a 1x1 convolution is one GEMM on the activation
as it lies in memory; a kxk or strided one gathers its windows with ``im2col_nhwc`` first
(its rows padded to a multiple of 8, so half-precision GEMMs keep tensor-core alignment); a
grouped one (ResNeXt) is computed directly by ``conv_grouped_nhwc``, epilogue included. GEMMs
go through numres's own cuBLASLt handle (:mod:`.blas`), with bias, residual and ReLU in the
GEMM's epilogue. Kernels are the CUDA C files of ``kernels/``, compiled once per device and
element type with ``cupy.RawModule`` (:mod:`.kernels`).

Precision: float32 by default, TF32 off. ``dtype="float16"`` stores weights and activations in
half precision (tensor cores; every sum accumulates in float32); ``tf32=True`` lets float32
GEMMs use TF32 tensor cores, in numres's GEMMs only (CuPy's own cuBLAS handle is never
touched). Both trade accuracy for speed.

Launch overhead: at small batches a pass is hundreds of tiny launches, so each input shape's
pass is captured into a CUDA graph and replayed (``cuda_graph=True``, :mod:`.graphs`).
Results are always copies: nothing handed out pins a workspace buffer. In float16 mode
results left on the device are float16; results returned as NumPy are float32 like every
backend's.

Example:
    >>> be = numres.get_backend("cupy", dtype="float16")
    >>> model = numres.resnet50(weights="DEFAULT", backend=be)
    >>> logits = model(cupy_batch)        # CuPy in, CuPy out; NumPy in, NumPy out
"""

import collections
import contextlib
import threading
from dataclasses import dataclass

import numpy as np

from ...errors import BackendUnavailable
from .._base import (Backend, batch_norm_affine, compose_conv_pool, conv_output_size,
                     conv_weight_matrix, copy_tree, nbytes, workspace_free_sizes)
from .._workspace import Workspace
from . import blas
from . import kernels as K
from .blas import WORKSPACE_BYTES, CublasLt
from .graphs import GraphRunner

_HINT = ("pip install numres[cuda] (or the cupy-cudaXXx wheel that matches your CUDA "
         "driver, e.g. cupy-cuda12x)")

try:
    import cupy
except ImportError as exc:
    raise BackendUnavailable(f"the 'cupy' backend needs CuPy and an NVIDIA GPU: {_HINT}") \
        from exc


def _check_device():
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, or driver older than the runtime
        raise BackendUnavailable(f"CuPy is installed but cannot use a GPU ({exc}); {_HINT}") \
            from exc
    if count == 0:
        raise BackendUnavailable("CuPy found no CUDA device")


_check_device()

#: Compiled kernels, shared by every backend instance of the process.
KERNELS = K.KernelCache(cupy)
_blas = None
_blas_lock = threading.Lock()
#: GEMM workspaces kept for streams that ran eager passes (graphs keep their own).
MAX_STREAM_WORKSPACES = 8


def _cublaslt():
    """The process's cuBLASLt (loaded on first use).

    Raises:
        BackendUnavailable: the library is missing.
    """
    global _blas
    with _blas_lock:
        if _blas is None:
            major = cupy.cuda.runtime.runtimeGetVersion() // 1000
            try:
                _blas = CublasLt(blas.open_cublaslt(major))
            except OSError as exc:
                raise BackendUnavailable(f"the 'cupy' backend needs cuBLASLt ({exc}); pip "
                                         f"install nvidia-cublas (CUDA {major})") from exc
        return _blas


@dataclass
class Conv:
    weight: object          # cupy (K, O) rows in im2col's (ky, kx, c) order; zero rows to k_gemm
    bias: object            # cupy (O,)
    kernel_size: int
    stride: int
    padding: int
    groups: int
    out_channels: int
    k_gemm: int             # the GEMM's reduction length (the im2col row length), or 0


@dataclass
class BatchNorm:
    scale: object           # cupy float32 (C,)
    shift: object


@dataclass
class Linear:
    weight_t: object        # cupy (in, out)
    bias: object


class CupyBackend(Backend):
    """NHWC CUDA backend. Activations are (N, H, W, C) CuPy arrays of ``dtype``.

    Args:
        dtype: ``"float32"`` (default) or ``"float16"``.
        tf32: allow TF32 tensor cores in float32 GEMMs.
        cuda_graph: capture each input shape's forward pass into a CUDA graph.
        max_graphs: captured shapes kept per model (each pins one pass's buffers).

    Raises:
        ValueError: another dtype, or ``max_graphs`` < 1.
        BackendUnavailable: cuBLASLt cannot be loaded.
    """

    name = "cupy"
    allocator = "pool"

    def __init__(self, dtype="float32", tf32=False, cuda_graph=True, max_graphs=2):
        self.dtype = np.dtype(dtype)
        if self.dtype not in K.CTYPES:
            raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
        self.ctype = K.CTYPES[self.dtype]
        self.tf32 = bool(tf32) and self.dtype == np.float32
        self.cuda_graph = cuda_graph
        self._shared_workspace = Workspace(allocate=self._allocate)
        self.graphs = GraphRunner(self, cupy, max_graphs)
        self._blas = _cublaslt()
        self._gemm_workspaces = collections.OrderedDict()    # stream ptr -> (stream, buffer)
        self._gemm_lock = threading.Lock()
        self._local = threading.local()

    def _allocate(self, nbytes):
        self._local.allocations = self.workspace_allocations + 1
        buf = cupy.empty(nbytes, cupy.uint8)
        owner = getattr(self._local, "graph_buffers", None)
        if owner is not None:
            # A graph's own pool: the graph keeps every block alive through its memory
            # pointer. (Not the array: the pool tells a free buffer by its reference count.)
            owner.append(buf.data)
        return buf

    @property
    def workspace_allocations(self):
        """Blocks this thread's workspaces have allocated so far (a capture's warm-up runs
        until a pass adds none)."""
        return getattr(self._local, "allocations", 0)

    @property
    def workspace(self):
        """The calling thread's buffer pool: the backend's, or while a graph is being
        captured, that graph's own (:meth:`graph_workspace`)."""
        return getattr(self._local, "graph_workspace", None) or self._shared_workspace

    @contextlib.contextmanager
    def graph_workspace(self):
        """Passes in this block (in this thread) take their buffers from a pool of their own;
        yields the list of the memory of every block that pool allocates, which the graph
        keeps for as long as it exists (whatever becomes of this thread and its pools)."""
        buffers = []
        self._local.graph_workspace = Workspace(allocate=self._allocate)
        self._local.graph_buffers = buffers
        try:
            yield buffers
        finally:
            self._local.graph_workspace = self._local.graph_buffers = None

    # -- kernels and GEMMs -----------------------------------------------------------------
    def _launch(self, expr, total, *args):
        KERNELS.get(expr, self.ctype)(K.launch_grid(total), (K.BLOCK,), args)

    def gemm_workspace(self, stream):
        """This stream's cuBLASLt workspace (one per stream: GEMMs on two streams may run at
        once). Made on first use, outside any capture."""
        entry = self._gemm_workspaces.get(stream.ptr)
        if entry is None:
            with self._gemm_lock:
                entry = self._gemm_workspaces.get(stream.ptr)
                if entry is None:
                    # the stream is kept too, so its handle cannot be reused by another
                    entry = (stream, cupy.empty(WORKSPACE_BYTES, cupy.uint8))
                    self._gemm_workspaces[stream.ptr] = entry
                    while len(self._gemm_workspaces) > MAX_STREAM_WORKSPACES:
                        self._gemm_workspaces.popitem(last=False)
        return entry[1]

    def forget_stream(self, stream):
        """Drop ``stream``'s GEMM workspace (its graph is gone)."""
        with self._gemm_lock:
            self._gemm_workspaces.pop(stream.ptr, None)

    def _gemm(self, w, x, y, ldx, bias, residual, relu):
        """``y = relu?(x @ w + bias + residual)``: x (n, k) rows ``ldx`` apart, w (k, m)."""
        stream = cupy.cuda.get_current_stream()
        workspace = self.gemm_workspace(stream)
        (k, m), n = w.shape, y.shape[0]
        fused = self._blas.gemm(stream.ptr, (workspace.data.ptr, workspace.nbytes),
                                w.data.ptr, x.data.ptr, y.data.ptr, m=m, n=n, k=k, ldx=ldx,
                                dtype=self.dtype, tf32=self.tf32, bias=_ptr(bias),
                                residual=_ptr(residual), relu=relu)
        if not fused:
            self._launch(f"bias_act<{self.ctype}>", y.size, y, bias, residual,
                         np.int32(residual is not None), np.int64(n), np.int32(m),
                         np.int32(relu))

    # -- data movement ---------------------------------------------------------------------
    def owns(self, x):
        return isinstance(x, cupy.ndarray)

    def from_nchw(self, x):
        x = self.to_device(x)            # NumPy input too (kernels take device arrays only)
        n, c, h, w = x.shape
        out = self.workspace.get((n, h, w, c), self.dtype)
        self._launch(f"nchw_to_nhwc<{self.ctype}>", out.size, x, out, np.int64(n),
                     np.int32(c), np.int32(h), np.int32(w))
        return out

    def to_nchw(self, act):
        n, h, w, c = act.shape
        out = self.workspace.get((n, c, h, w), np.float32)
        self._launch(f"nhwc_to_nchw<{self.ctype}>", out.size, act, out, np.int64(n),
                     np.int32(c), np.int32(h), np.int32(w))
        return out

    def to_device(self, x):
        return cupy.ascontiguousarray(cupy.asarray(x, dtype=cupy.float32))

    def to_numpy(self, array):
        # float16 results (dtype="float16") come back as float32, like every other backend's
        return cupy.asnumpy(array).astype(np.float32, copy=False)

    def synchronize(self):
        cupy.cuda.get_current_stream().synchronize()

    # -- weights ---------------------------------------------------------------------------
    def prepare_conv(self, weight, bias, stride, padding, groups):
        o, cg, k, _ = weight.shape
        bias = np.zeros(o, np.float32) if bias is None else bias
        w = conv_weight_matrix(weight, 1)            # (k*k*Cg, O), rows (ky, kx, c)
        k_gemm = 0
        if groups == 1:
            # the GEMM reads im2col rows padded to a multiple of 8 (or the activation itself
            # for a 1x1 stride-1 convolution): zero weight rows meet the padding
            k_gemm = cg if (k, stride, padding) == (1, 1, 0) else K.padded_k(k * k * cg)
            w = np.concatenate([w, np.zeros((k_gemm - w.shape[0], o), w.dtype)])
        return Conv(self._device(w), self._device(bias), k, stride, padding, groups, o, k_gemm)

    def prepare_batch_norm(self, mean, var, weight, bias, eps):
        scale, shift = batch_norm_affine(mean, var, weight, bias, eps)
        return BatchNorm(self._device(scale, np.float32), self._device(shift, np.float32))

    def prepare_linear(self, weight, bias):
        return Linear(self._device(np.asarray(weight).T), self._device(bias))

    def _device(self, array, dtype=None):
        """Copy host weights to the device once, in the backend's dtype. The copy is made on
        the current stream and waited for: any stream may read weights later."""
        out = cupy.asarray(np.ascontiguousarray(array, dtype or self.dtype))
        cupy.cuda.get_current_stream().synchronize()
        return out

    # -- operations ------------------------------------------------------------------------
    def conv2d(self, x, conv, relu=False, residual=None):
        n, h, w, c = x.shape
        k, s, p, o, g = (conv.kernel_size, conv.stride, conv.padding, conv.out_channels,
                         conv.groups)
        out_h, out_w = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
        m = n * out_h * out_w
        y = self.workspace.get((n, out_h, out_w, o), self.dtype)
        if g > 1:
            self._launch(f"conv_grouped_nhwc<{self.ctype}>", y.size, x, conv.weight, conv.bias,
                         residual, np.int32(residual is not None), y, np.int64(n),
                         np.int32(h), np.int32(w), np.int32(c), np.int32(k), np.int32(s),
                         np.int32(p), np.int32(out_h), np.int32(out_w), np.int32(o),
                         np.int32(g), np.int32(relu))
            return y
        if (k, s, p) == (1, 1, 0):
            a = x.reshape(m, c)                                        # (N*H*W, C)
        else:
            vec = K.im2col_vec(self.ctype, c)
            a = self.workspace.get((m, conv.k_gemm), self.dtype)      # (M, K padded)
            self._launch(f"im2col_nhwc<{self.ctype}, {vec}>", a.size // vec, x, a,
                         np.int64(n), np.int32(h), np.int32(w), np.int32(c), np.int32(k),
                         np.int32(s), np.int32(p), np.int32(out_h), np.int32(out_w),
                         np.int32(conv.k_gemm))
        res = None if residual is None else residual.reshape(m, o)     # (M, O)
        self._gemm(conv.weight, a, y.reshape(m, o), conv.k_gemm, conv.bias, res, relu)
        return y

    def batch_norm(self, x, bn, relu=False, residual=None):
        n, h, w, c = x.shape
        out = self.workspace.get(x.shape, self.dtype)
        self._launch(f"batch_norm<{self.ctype}>", out.size, x, bn.scale, bn.shift, residual,
                     np.int32(residual is not None), out, np.int64(n * h * w), np.int32(c),
                     np.int32(relu))
        return out

    def max_pool2d(self, x, kernel_size, stride, padding):
        n, h, w, c = x.shape
        out_h = conv_output_size(h, kernel_size, stride, padding)
        out_w = conv_output_size(w, kernel_size, stride, padding)
        out = self.workspace.get((n, out_h, out_w, c), self.dtype)
        self._launch(f"max_pool_nhwc<{self.ctype}>", out.size, x, out, np.int64(n),
                     np.int32(h), np.int32(w), np.int32(c), np.int32(kernel_size),
                     np.int32(stride), np.int32(padding), np.int32(out_h), np.int32(out_w))
        return out

    def global_avg_pool(self, x):
        n, h, w, c = x.shape
        pooled = self.workspace.get((n, c), self.dtype)
        self._launch(f"global_avg_pool_nhwc<{self.ctype}>", pooled.size, x, pooled,
                     np.int64(n), np.int32(h * w), np.int32(c))
        return pooled

    def linear(self, x, fc):
        n, (k, o) = x.shape[0], fc.weight_t.shape
        x = cupy.ascontiguousarray(x, self.dtype)
        y = self.workspace.get((n, o), self.dtype)
        self._gemm(fc.weight_t, x, y, k, fc.bias, None, False)
        return y

    # -- passes ----------------------------------------------------------------------------
    def execute(self, cache, key, fn, x):
        """Run ``fn(x)`` (device arrays in and out): replayed from a CUDA graph captured for
        ``key`` (:mod:`.graphs`), or eagerly. ``cache`` is a dict owned by the model's
        prepared weights, so a graph never outlives the buffers it points at. Results are
        copies (the pass's own buffers are reused by the next pass)."""
        if self.cuda_graph:
            return self.graphs.run(cache, key, fn, x)
        return self.eager(fn, x)

    def eager(self, fn, x):
        """One pass on the caller's stream, results copied out of the workspace."""
        stream = cupy.cuda.get_current_stream()
        self.order_workspace(stream)
        try:
            return self.copy_results(fn(x))
        finally:
            self.workspace_done(stream)

    @staticmethod
    def copy_results(out):
        return copy_tree(out)

    def order_workspace(self, stream):
        """Make ``stream`` wait for this thread's last pass, if that ran on another stream:
        the thread's workspace buffers are reused by the next pass whatever its stream."""
        last = getattr(self._local, "last", None)
        if last is not None and last[0] != stream.ptr:
            stream.wait_event(last[1])

    def workspace_done(self, stream):
        self._local.last = (stream.ptr, stream.record())

    # -- memory (device memory: what the check in numres.models.memory compares) -----------
    @property
    def keeps_buffers_per_shape(self):
        return self.cuda_graph

    def device_memory(self):
        device = cupy.cuda.Device()
        free, _ = device.mem_info                      # what the driver can still hand out
        # plus blocks CuPy's pool holds but no array uses: the pass allocates from those first
        cached = cupy.get_default_memory_pool().free_bytes()
        return free + cached, f"free memory of CUDA device {device.id} (+ CuPy's free pool)"

    def reusable_buffers(self, cache, key):
        if self.cuda_graph:
            entry = cache.get(key)
            if self.graphs.captured(entry):
                return None
            if entry is None:            # to be captured: with a pool of its own
                return []
        return workspace_free_sizes(self._shared_workspace)

    def memory_events(self, op):
        """Device bytes of each op, following :meth:`conv2d` and friends."""
        item = self.dtype.itemsize
        if op.kind == "input":
            n, c, h, w = op.x
            # to_device's float32 copy, a GEMM workspace for the stream, and with graphs the
            # graph's own input and GEMM workspace
            events = [("heap", "device_input", nbytes(op.x)),
                      ("heap", "gemm_workspace", WORKSPACE_BYTES)]
            if self.cuda_graph:
                events += [("heap", "graph_input", nbytes(op.x)),
                           ("heap", "graph_gemm_workspace", WORKSPACE_BYTES)]
            return events + [("alloc", "out", nbytes((n, h, w, c), item))]
        if op.kind == "conv":
            n, c, _, _ = op.x
            _, o, oh, ow = op.y
            m = n * oh * ow
            events = [("alloc", "out", nbytes((m, o), item))]
            if op.groups == 1 and (op.kernel, op.stride, op.padding) != (1, 1, 0):
                k_gemm = K.padded_k(op.kernel ** 2 * c)
                events += [("alloc", "im2col", nbytes((m, k_gemm), item)), ("free", "im2col")]
            return events
        if op.kind == "conv_pool":
            return compose_conv_pool(self, op)
        if op.kind == "to_nchw":
            return [("alloc", "out", nbytes(op.y))]                     # always float32
        if op.kind == "output":
            # execute() copies every result (float32 bytes: an upper bound for float16)
            return [("heap", f"result{i}", nbytes(shape)) for i, shape in enumerate(op.results)]
        return [("alloc", "out", nbytes(op.y, item))]


def _ptr(array):
    return None if array is None else array.data.ptr
