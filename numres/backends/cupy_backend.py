"""The CUDA backend: NHWC activations on the GPU, cuBLAS GEMMs, numres's own kernels.

Layout and strategy mirror the Numba backend: a 1x1 convolution is one GEMM on the activation
as it lies in memory (``cupy.matmul`` -> cuBLAS); a kxk or strided convolution gathers its
windows with ``im2col_nhwc`` first; bias, residual and ReLU are one fused kernel. Kernels are
the CUDA C files of ``kernels/``, compiled once per device with ``cupy.RawModule``.

Precision: float32 by default with TF32 off (cuBLAS's default math). ``dtype="float16"``
stores weights and activations in half precision (tensor cores; kernels accumulate in
float); ``tf32=True`` lets float32 GEMMs use TF32 tensor cores. Both trade accuracy for speed.

Launch overhead: at small batches a forward pass is hundreds of tiny launches, so the whole
pass is captured once per input shape into a CUDA graph and replayed (``cuda_graph=True``).
Every buffer the graph touches comes from this backend's workspace and stays allocated.
In float16 mode, results left on the device are float16; results returned as NumPy are
float32 like every backend's.

Example:
    >>> be = numres.get_backend("cupy", dtype="float16")
    >>> model = numres.resnet50(weights="DEFAULT", backend=be)
    >>> logits = model(cupy_batch)        # CuPy in, CuPy out; NumPy in, NumPy out
"""

import threading
from dataclasses import dataclass

import numpy as np

from ..errors import BackendUnavailable
from ._base import (Backend, compose_conv_pool, conv_output_size, nbytes,
                    workspace_free_sizes)

_HINT = ("pip install numres[cuda] (or the cupy-cudaXXx wheel that matches your CUDA "
         "driver, e.g. cupy-cuda12x)")

try:
    import cupy
    from cupy_backends.cuda.libs import cublas
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

from .._kernels import KERNELS, SOURCES, kernel_dir, kernel_source  # noqa: E402
from ._workspace import Workspace  # noqa: E402

_BLOCK = 256
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float16): "__half"}


@dataclass
class Conv:
    weight: object          # cupy (k*k*C, O), or (G, k*k*C/G, O/G) when grouped
    bias: object            # cupy (O,)
    kernel_size: int
    stride: int
    padding: int
    groups: int
    out_channels: int


@dataclass
class BatchNorm:
    scale: object           # cupy float32 (C,)
    shift: object


@dataclass
class Linear:
    weight_t: object        # cupy (in, out)
    bias: object


def _grid(total):
    return (int(min((total + _BLOCK - 1) // _BLOCK, 1 << 20)) or 1,)


class CupyBackend(Backend):
    """NHWC CUDA backend. Activations are (N, H, W, C) CuPy arrays of ``dtype``.

    Args:
        dtype: ``"float32"`` (default) or ``"float16"``.
        tf32: allow TF32 tensor cores in float32 GEMMs.
        cuda_graph: capture each input shape's forward pass into a CUDA graph.
    """

    name = "cupy"

    def __init__(self, dtype="float32", tf32=False, cuda_graph=True):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CTYPES:
            raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
        self.tf32, self.cuda_graph = tf32, cuda_graph
        self.workspace = Workspace(allocate=lambda nbytes: cupy.empty(nbytes, cupy.uint8))
        self._modules = {}
        self._graph_lock = threading.Lock()
        self._dummy = cupy.zeros(1, self.dtype)
        # CUBLAS_TF32_TENSOR_OP_MATH (3) or CUBLAS_DEFAULT_MATH (0)
        self._math_mode = 3 if tf32 and self.dtype == np.float32 else 0

    # -- kernels ---------------------------------------------------------------------------
    def _kernel(self, name, dtype=None):
        """A compiled kernel, e.g. ``im2col_nhwc<float>``, from this device's module.

        One module per (device, element type): the float32 build defines NUMRES_NO_HALF,
        so it never needs cuda_fp16.h.
        """
        ctype = _CTYPES[np.dtype(dtype or self.dtype)]
        key = (cupy.cuda.Device().id, ctype)
        module = self._modules.get(key)
        if module is None:
            code = "\n".join(kernel_source(s) for s in SOURCES)
            options = ("-std=c++17", f"-I{kernel_dir()}") + \
                (("-DNUMRES_NO_HALF",) if ctype == "float" else ())
            module = cupy.RawModule(code=code, options=options,
                                    name_expressions=[f"{k}<{ctype}>" for k in KERNELS])
            self._modules[key] = module
        return module.get_function(f"{name}<{ctype}>")

    def _launch(self, name, total, *args, dtype=None):
        self._kernel(name, dtype)(_grid(total), (_BLOCK,), args)

    def _matmul(self, a, b, out):
        # cuBLAS's handle is shared by every CuPy user in the process, so the math mode is
        # set for each GEMM: TF32 tensor ops only for a backend that opted in.
        cublas.setMathMode(cupy.cuda.device.get_cublas_handle(), self._math_mode)
        return cupy.matmul(a, b, out=out)

    # -- data movement ---------------------------------------------------------------------
    def owns(self, x):
        return isinstance(x, cupy.ndarray)

    def from_nchw(self, x):
        n, c, h, w = x.shape
        out = self.workspace.get((n, h, w, c), self.dtype)
        self._launch("nchw_to_nhwc", out.size, x, out, np.int64(n), np.int32(c), np.int32(h),
                     np.int32(w))
        return out

    def to_nchw(self, act):
        n, h, w, c = act.shape
        out = self.workspace.get((n, c, h, w), np.float32)
        self._launch("nhwc_to_nchw", out.size, act, out, np.int64(n), np.int32(c),
                     np.int32(h), np.int32(w))
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
        if groups > 1:
            # (G, O/G, Cg, kh, kw) -> (G, kh, kw, Cg, O/G): rows in im2col's (ky, kx, c) order
            w = weight.reshape(groups, o // groups, cg, k, k).transpose(0, 3, 4, 2, 1)
            w = w.reshape(groups, k * k * cg, o // groups)
        else:
            w = weight.transpose(2, 3, 1, 0).reshape(k * k * cg, o)   # (kh, kw, C, O)
        return Conv(self._device(w), self._device(bias), k, stride, padding, groups, o)

    def prepare_batch_norm(self, mean, var, weight, bias, eps):
        scale = weight.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
        shift = bias - mean * scale
        return BatchNorm(cupy.asarray(scale, cupy.float32), cupy.asarray(shift, cupy.float32))

    def prepare_linear(self, weight, bias):
        return Linear(self._device(weight.T), self._device(bias))

    def _device(self, array):
        """Copy host weights to the device once, in the backend's dtype."""
        return cupy.ascontiguousarray(cupy.asarray(np.asarray(array), dtype=self.dtype))

    # -- operations ------------------------------------------------------------------------
    def conv2d(self, x, conv, relu=False, residual=None):
        n, h, w, c = x.shape
        k, s, p, o, g = conv.kernel_size, conv.stride, conv.padding, conv.out_channels, \
            conv.groups
        out_h, out_w = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
        m = n * out_h * out_w
        y = self.workspace.get((n, out_h, out_w, o), self.dtype)
        res = self._dummy if residual is None else residual
        has_res = np.int32(residual is not None)
        if k == 1 and s == 1 and p == 0 and g == 1:
            a = x.reshape(m, c)                                         # (N*H*W, C)
        else:
            a = self.workspace.get((g, m, k * k * (c // g)), self.dtype)  # (G, M, K)
            self._launch("im2col_nhwc", a.size, x, a, np.int64(n), np.int32(h), np.int32(w),
                         np.int32(c), np.int32(k), np.int32(s), np.int32(p),
                         np.int32(out_h), np.int32(out_w), np.int32(g))
        if g == 1:
            y2 = y.reshape(m, o)
            self._matmul(a.reshape(m, -1), conv.weight, y2)
            self._launch("bias_act", y2.size, y2, conv.bias, res, has_res, np.int64(m),
                         np.int32(o), np.int32(relu))
        else:
            yg = self.workspace.get((g, m, o // g), self.dtype)
            self._matmul(a, conv.weight, yg)                            # (G, M, O/G)
            self._launch("bias_act_grouped", y.size, yg, conv.bias, res, has_res, y,
                         np.int64(m), np.int32(o), np.int32(g), np.int32(relu))
        return y

    def batch_norm(self, x, bn, relu=False, residual=None):
        n, h, w, c = x.shape
        out = self.workspace.get(x.shape, self.dtype)
        res = self._dummy if residual is None else residual
        self._launch("batch_norm", out.size, x, bn.scale, bn.shift, res,
                     np.int32(residual is not None), out, np.int64(n * h * w), np.int32(c),
                     np.int32(relu))
        return out

    def max_pool2d(self, x, kernel_size, stride, padding):
        n, h, w, c = x.shape
        out_h = conv_output_size(h, kernel_size, stride, padding)
        out_w = conv_output_size(w, kernel_size, stride, padding)
        out = self.workspace.get((n, out_h, out_w, c), self.dtype)
        self._launch("max_pool_nhwc", out.size, x, out, np.int64(n), np.int32(h), np.int32(w),
                     np.int32(c), np.int32(kernel_size), np.int32(stride), np.int32(padding),
                     np.int32(out_h), np.int32(out_w))
        return out

    def global_avg_pool(self, x):
        n, h, w, c = x.shape
        pooled = self.workspace.get((n, c), self.dtype)
        self._launch("global_avg_pool_nhwc", pooled.size, x, pooled, np.int64(n),
                     np.int32(h * w), np.int32(c))
        return pooled

    def linear(self, x, fc):
        n, o = x.shape[0], fc.weight_t.shape[1]
        y = self.workspace.get((n, o), self.dtype)
        self._matmul(x, fc.weight_t, y)
        self._launch("bias_act", y.size, y, fc.bias, self._dummy, np.int32(0), np.int64(n),
                     np.int32(o), np.int32(0))
        return y

    # -- memory (device memory: what the check in numres.models.memory compares) -----------
    allocator = "pool"

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
        entry = cache.get(key) if self.cuda_graph else None
        if entry is not None and not isinstance(entry, str):     # a captured graph
            return None
        return workspace_free_sizes(self.workspace)

    def memory_events(self, op):
        """Device bytes of each op, following :meth:`conv2d` and friends."""
        item = self.dtype.itemsize
        if op.kind == "input":
            n, c, h, w = op.x
            events = [("heap", "device_input", nbytes(op.x))]        # to_device, float32
            if self.cuda_graph:
                events.append(("heap", "graph_input", nbytes(op.x)))  # the graph's own input
            return events + [("alloc", "out", nbytes((n, h, w, c), item))]
        if op.kind == "conv":
            n, c, _, _ = op.x
            _, o, oh, ow = op.y
            k, g, m = op.kernel, op.groups, n * oh * ow
            gathers = (k, op.stride, op.padding, g) != (1, 1, 0, 1)
            events = [("alloc", "out", nbytes((m, o), item))]
            if gathers:
                events.append(("alloc", "im2col", nbytes((m, k * k * c), item)))   # (G, M, K)
            if g > 1:
                events += [("alloc", "grouped", nbytes((m, o), item)), ("free", "grouped")]
            return events + [("free", "im2col")] * gathers
        if op.kind == "conv_pool":
            return compose_conv_pool(self, op)
        if op.kind == "to_nchw":
            return [("alloc", "out", nbytes(op.y))]                     # always float32
        if op.kind == "output":
            return [("heap", f"result{i}", nbytes(shape)) for i, shape in enumerate(op.results)]
        return [("alloc", "out", nbytes(op.y, item))]

    # -- CUDA graphs -----------------------------------------------------------------------
    def execute(self, cache, key, fn, x):
        """Run ``fn(x)`` (device arrays in and out) as a CUDA graph captured for ``key``.

        ``cache`` is a dict owned by the model's prepared weights, so a graph never outlives
        the device buffers it points at.

        The first call per key runs ``fn`` once eagerly (every workspace buffer gets
        allocated), then captures a second run. Later calls copy ``x`` into the captured
        input buffer and replay the graph. Outputs are copied before they are returned, as
        the next replay overwrites them. Capture failures fall back to eager runs.
        """
        if not self.cuda_graph:
            return fn(x)
        with self._graph_lock:
            entry = cache.get(key)
            if entry is None:
                entry = cache[key] = self._capture(fn, x)
            if entry == "eager":
                return fn(x)
            graph, static_in, static_out, stream, _ = entry
            # Our stream waits for whatever the caller's stream queued to produce x.
            stream.wait_event(cupy.cuda.get_current_stream().record())
            with stream:
                static_in[...] = x
                graph.launch(stream)
                result = _copy_tree(static_out)
            stream.synchronize()
            return result

    def _capture(self, fn, x):
        cupy.cuda.get_current_stream().synchronize()
        static_in = cupy.array(x, copy=True)
        stream = cupy.cuda.Stream(non_blocking=True)
        try:
            with stream:
                warm = fn(static_in)
                del warm                        # let the capture reuse the same buffers
                stream.synchronize()
                self.workspace.track()
                stream.begin_capture()
                try:
                    static_out = fn(static_in)
                finally:
                    graph = stream.end_capture()
                    # The graph replays into these addresses: keep them from being reused.
                    pinned = self.workspace.untrack()
            stream.synchronize()
        except Exception:  # noqa: BLE001 - any capture failure: run this shape eagerly
            return "eager"
        return graph, static_in, static_out, stream, pinned


def _copy_tree(out):
    if isinstance(out, dict):
        return {k: v.copy() for k, v in out.items()}
    return out.copy()
