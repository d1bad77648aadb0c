"""The slice of CuPy's API that numres uses, over the emulated device of ``device.py``.

Each class and function behaves as its CuPy namesake does for the arguments numres passes,
and refuses what CuPy (or CUDA under it) refuses; see the package docstring for each rule
and where it comes from. Anything outside the slice is an ``AttributeError`` or a
``NotImplementedError`` saying so, never a silent approximation.
"""

import collections
import threading

import numpy as np

from .device import CUDARuntimeError, OutOfMemoryError, StandinError  # noqa: F401

#: The installed runtime (one at a time: ``install()`` sets it, the fixture's teardown
#: clears it).
RT = None


def _rt():
    if RT is None:
        raise RuntimeError("the CuPy stand-in is not installed")
    return RT


class Runtime:
    """Per-install state: the device, each thread's current stream, CuPy's cuBLAS handle,
    compiled modules, counters the tests read."""

    def __init__(self, device):
        self.device = device
        self.local = threading.local()
        self.cublas_handle = 0xC0B1A5
        self.cublas_stream = {self.cublas_handle: 0}
        self.cublas_math = {self.cublas_handle: 0}
        self.null_stream = None
        self.stats = {"modules": 0, "functions": 0, "launches": 0, "cublas_calls": 0,
                      "kernels": collections.Counter(), "matmul_k": []}

    def current(self):
        stack = getattr(self.local, "streams", None)
        return stack[-1] if stack else self.null_stream


# -- arrays ----------------------------------------------------------------------------------
class MemoryPointer:
    """``cupy.cuda.MemoryPointer``: an address inside a block of device memory."""

    def __init__(self, mem, ptr):
        self.mem, self.ptr, self.device_id = mem, ptr, 0


class _Flags:
    def __init__(self, host, owndata):
        self.c_contiguous = host.flags.c_contiguous
        self.f_contiguous = host.flags.f_contiguous
        self.owndata = owndata

    def __getitem__(self, name):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[name]


class ndarray:
    """``cupy.ndarray``: an array in (emulated) device memory.

    ``cupy.ndarray(shape, dtype)`` allocates, as in CuPy. Views (slicing, ``reshape``,
    ``view``) share the block and name the array owning it as their ``base``, as CuPy does.
    """

    __array_priority__ = 100

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None or order != "C":
            raise NotImplementedError("the stand-in's ndarray(...) takes shape and dtype only")
        shape = (shape,) if np.isscalar(shape) else tuple(shape)
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        alloc = _rt().device.allocate(nbytes)
        self._alloc = alloc
        self._host = alloc.buf[:nbytes].view(dtype).reshape(shape)
        self.base = None

    @classmethod
    def _wrap(cls, alloc, host, base):
        arr = cls.__new__(cls)
        arr._alloc, arr._host = alloc, host
        arr.base = None if base is None else (base.base if base.base is not None else base)
        return arr

    # -- attributes ------------------------------------------------------------------------
    shape = property(lambda self: self._host.shape)
    dtype = property(lambda self: self._host.dtype)
    size = property(lambda self: self._host.size)
    ndim = property(lambda self: self._host.ndim)
    nbytes = property(lambda self: self._host.nbytes)
    itemsize = property(lambda self: self._host.itemsize)
    strides = property(lambda self: self._host.strides)
    flags = property(lambda self: _Flags(self._host, self.base is None))
    device = property(lambda self: Device(0))

    @property
    def data(self):
        return MemoryPointer(self._alloc, self._host.__array_interface__["data"][0])

    def __len__(self):
        return len(self._host)

    def __repr__(self):
        return f"standin.ndarray(shape={self.shape}, dtype={self.dtype})"

    def __array__(self, *args, **kwargs):
        # cupy/_core/core.pyx: ndarray.__array__ refuses implicit device-to-host copies.
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def __array_function__(self, func, types, args, kwargs):
        impl = {np.empty_like: empty_like, np.zeros_like: zeros_like}.get(func)
        return NotImplemented if impl is None else impl(*args, **kwargs)

    def __array_ufunc__(self, *args, **kwargs):
        return NotImplemented

    # -- views -----------------------------------------------------------------------------
    def _view(self, host):
        return ndarray._wrap(self._alloc, host, self)

    def reshape(self, *shape, order="C"):
        shape = shape[0] if len(shape) == 1 and not np.isscalar(shape[0]) else shape
        if not self._host.flags.c_contiguous:
            return self.copy().reshape(shape)          # CuPy copies when it must, too
        return self._view(self._host.reshape(shape))

    def view(self, dtype=None):
        return self._view(self._host.view(dtype) if dtype is not None else self._host.view())

    @property
    def T(self):
        return self._view(self._host.T)

    def transpose(self, *axes):
        return self._view(self._host.transpose(*axes))

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, (ndarray, np.ndarray, list)) or isinstance(k, (bool, np.bool_))
               for k in key):
            raise NotImplementedError("the stand-in supports basic indexing only")
        if Ellipsis not in key:
            key += (Ellipsis,)       # a 0-d view rather than a NumPy scalar
        return self._view(self._host[key])

    # -- operations on the current stream --------------------------------------------------
    def __setitem__(self, key, value):
        dst = self[key]
        if isinstance(value, ndarray):
            def run():
                np.copyto(dst._host, value._host, casting="unsafe")
            _enqueue("setitem (device copy)", run,
                     [(value._alloc.ptr, "r"), (dst._alloc.ptr, "w")])
        else:                                  # a host value: a host-to-device copy
            src = np.asarray(value)
            _enqueue("setitem (host to device)",
                     lambda: np.copyto(dst._host, src, casting="unsafe"),
                     [(dst._alloc.ptr, "w")])

    def fill(self, value):
        self[...] = value

    def copy(self, order="C"):
        out = empty(self.shape, self.dtype)
        out[...] = self
        return out

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        dtype = np.dtype(dtype)
        if dtype == self.dtype and not copy:
            return self
        out = empty(self.shape, dtype)
        out[...] = self
        return out

    def get(self, stream=None, order="C", out=None):
        """Device to host: a copy on ``stream`` (default: current), then the host waits."""
        rt = _rt()
        state = (stream or rt.current())._state
        result = np.empty(self.shape, self.dtype)
        rt.device.enqueue(state, "get (device to host)", lambda: np.copyto(result, self._host),
                          [(self._alloc.ptr, "r")])
        rt.device.host_sync(stream=state, what="device-to-host copy")
        if out is not None:
            np.copyto(out, result)
            return out
        return result


def _enqueue(label, run, accesses, stream=None):
    rt = _rt()
    rt.device.enqueue((stream or rt.current())._state, label, run, accesses)


def empty(shape, dtype=float, order="C"):
    return ndarray(shape, dtype)


def zeros(shape, dtype=float, order="C"):
    out = ndarray(shape, dtype)
    out.fill(0)
    return out


def empty_like(a, dtype=None, order="K", subok=None, shape=None):
    return empty(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def zeros_like(a, dtype=None, order="K", subok=None, shape=None):
    return zeros(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def _from_host(obj, dtype=None):
    host = np.ascontiguousarray(np.asarray(obj, dtype))
    out = empty(host.shape, host.dtype)
    out[...] = host
    return out


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    return _from_host(a, dtype)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0):
    if isinstance(obj, ndarray):
        return obj.astype(obj.dtype if dtype is None else dtype, copy=copy)
    return _from_host(obj, dtype)


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray):
        same = dtype is None or np.dtype(dtype) == a.dtype
        if same and a.flags.c_contiguous:
            return a
        return a.astype(a.dtype if dtype is None else dtype)
    return _from_host(a, dtype)


def asnumpy(a, stream=None, order="C", out=None):
    if isinstance(a, ndarray):
        return a.get(stream=stream, out=out)
    return np.asarray(a)


def get_array_module(*args):
    import sys
    return sys.modules["cupy"] if any(isinstance(a, ndarray) for a in args) else np


# -- the memory pool -------------------------------------------------------------------------
class MemoryPool:
    """``cupy.get_default_memory_pool()``: blocks are fresh host buffers, but the byte counts
    follow CuPy's caching pool, which keeps what it was asked for until
    ``free_all_blocks`` (its high-water mark, fragmentation aside)."""

    def used_bytes(self):
        return _rt().device.used_bytes

    def total_bytes(self):
        return _rt().device.pool_bytes

    def free_bytes(self):
        device = _rt().device
        return device.pool_bytes - device.used_bytes

    def free_all_blocks(self, stream=None):
        device = _rt().device
        with device.lock:
            device.pool_bytes = device.used_bytes

    def n_free_blocks(self):
        return 0


_POOL = MemoryPool()


def get_default_memory_pool():
    return _POOL


# -- streams, events, graphs -----------------------------------------------------------------
class Stream:
    """``cupy.cuda.Stream`` (cupy/cuda/stream.pyx): ``null`` is the legacy default stream;
    ``non_blocking`` streams do not synchronise with it."""

    null = None

    def __init__(self, null=False, non_blocking=False, ptds=False):
        if ptds:
            raise NotImplementedError("the stand-in has no per-thread default stream")
        device = _rt().device
        self._state = device.null if null else device.new_stream(blocking=not non_blocking)
        self.ptr = self._state.key
        self.device_id = -1 if null else 0

    def __enter__(self):
        rt = _rt()
        stack = getattr(rt.local, "streams", None)
        if stack is None:
            stack = rt.local.streams = []
        stack.append(self)
        return self

    def __exit__(self, *exc):
        _rt().local.streams.pop()

    def use(self):
        rt = _rt()
        stack = getattr(rt.local, "streams", None)
        if stack:
            stack[-1] = self
        else:
            rt.local.streams = [self]
        return self

    def synchronize(self):
        _rt().device.host_sync(stream=self._state, what="stream synchronize")

    def record(self, event=None):
        event = Event() if event is None else event
        event._clock = _rt().device.record(self._state)
        return event

    def wait_event(self, event):
        _rt().device.wait(self._state, event._clock)

    def begin_capture(self, mode=None):
        # stream.pyx: CuPy defaults to the relaxed mode (so that its pool may cudaMalloc).
        _rt().device.begin_capture(self._state, 2 if mode is None else int(mode))

    def end_capture(self):
        return Graph(_rt().device.end_capture(self._state))

    def is_capturing(self):
        return self._state.capture is not None

    @property
    def done(self):
        return True          # work is done when it is enqueued

    def __eq__(self, other):
        return isinstance(other, Stream) and other.ptr == self.ptr

    def __hash__(self):
        return hash(self.ptr)


class Event:
    """``cupy.cuda.Event``: carries the clock of the stream it was recorded on."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._clock = None
        self.ptr = id(self)

    def record(self, stream=None):
        (stream or _rt().current()).record(self)

    def synchronize(self):
        _rt().device.host_sync(clock=self._clock or {}, what="event synchronize")

    @property
    def done(self):
        return True


class Graph:
    """``cupy.cuda.graph.Graph``: made by ``Stream.end_capture`` only (as in CuPy)."""

    def __init__(self, nodes):
        self._nodes = tuple(nodes)

    def launch(self, stream=None):
        _rt().device.launch_graph((stream or _rt().current())._state, self._nodes)

    def upload(self, stream=None):
        pass


def get_current_stream(device_id=None):
    return _rt().current()


class Device:
    """``cupy.cuda.Device``: one device, id 0."""

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def use(self):
        pass

    def synchronize(self):
        _rt().device.host_sync(what="device synchronize")

    @property
    def mem_info(self):
        device = _rt().device
        return device.total_bytes - device.pool_bytes, device.total_bytes

    @property
    def compute_capability(self):
        return "90"


# -- kernels ---------------------------------------------------------------------------------
_PROGRAMS = {}


def _host_program(code, options):
    from .. import cuda_host
    key = (code, tuple(options))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = cuda_host.HostProgram(code, options)
    return _PROGRAMS[key]


class RawModule:
    """``cupy.RawModule(code=..., options=..., name_expressions=...)``: the code compiled
    for the host (``tests/backends/cuda_host``); each name expression must be one of the
    text's explicit instantiations."""

    def __init__(self, code=None, path=None, options=(), backend="nvrtc",
                 translate_cucomplex=False, *, enable_cooperative_groups=False,
                 name_expressions=None, jitify=False):
        if code is None or path is not None or jitify or enable_cooperative_groups:
            raise NotImplementedError("the stand-in compiles code= only")
        rt = _rt()
        rt.stats["modules"] += 1
        self._program = _host_program(code, options)
        self._names = tuple(name_expressions or ())
        for name in self._names:
            if name not in self._program.signatures:
                raise StandinError(f"name expression {name!r} is not explicitly "
                                   "instantiated in the code (the host emulation needs it)")

    def get_function(self, name):
        if name not in self._names:
            raise CUDARuntimeError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        _rt().stats["functions"] += 1
        return RawKernel._from(self._program.kernel(name))


def _pointer_bytes(arg):
    """An argument as ``cupy/cuda/function.pyx``'s ``_pointer`` passes it: device arrays by
    address, NumPy arrays of size one and scalars by value, anything else refused."""
    if arg is None:
        return bytes(8), None                      # CIntptr(0): a NULL pointer
    if isinstance(arg, ndarray):
        ptr = arg.data.ptr
        return ptr.to_bytes(8, "little"), ptr
    if isinstance(arg, MemoryPointer):
        return arg.ptr.to_bytes(8, "little"), arg.ptr
    if isinstance(arg, np.ndarray):
        if arg.size == 1:                          # CNumpyArray: the value, by itemsize
            return arg.tobytes(), None
        raise TypeError(f"You are trying to pass a numpy.ndarray of shape {arg.shape} as a "
                        "kernel parameter. Only numpy.ndarrays of size one can be passed by "
                        "value. If you meant to pass a pointer to __global__ memory, you need "
                        "to pass a cupy.ndarray instead.")
    if isinstance(arg, bool):
        return np.bool_(arg).tobytes(), None
    if isinstance(arg, int):                       # _scalar.pyx: Python int -> int64
        return (np.uint64(arg) if arg >= 2 ** 63 else np.int64(arg)).tobytes(), None
    if isinstance(arg, float):
        return np.float64(arg).tobytes(), None
    if isinstance(arg, complex):
        return np.complex128(arg).tobytes(), None
    if isinstance(arg, np.generic):
        return arg.tobytes(), None
    raise TypeError(f"Unsupported type {type(arg)}")


class RawKernel:
    """A kernel of a :class:`RawModule`, launched as ``kernel(grid, block, args)``."""

    @classmethod
    def _from(cls, host_kernel):
        kernel = cls.__new__(cls)
        kernel._kernel = host_kernel
        kernel.name = host_kernel.expr
        return kernel

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None,
                 enable_cooperative_groups=False):
        if not isinstance(grid, tuple) or not isinstance(block, tuple):
            raise TypeError("grid and block must be tuples")     # Function.__call__(tuple...)
        rt = _rt()
        device = rt.device
        grid3, block3 = (grid + (1, 1))[:3], (block + (1, 1))[:3]
        if np.prod(block3) > 1024 or grid3[0] >= 2 ** 31 or max(grid3[1:]) > 65535 or \
                min(grid3 + block3) < 1:
            raise CUDARuntimeError(f"CUDA_ERROR_INVALID_VALUE: grid {grid}, block {block}")
        if shared_mem:
            raise NotImplementedError("the stand-in's kernels use no shared memory")
        params = self._kernel.params
        if len(args) != len(params):
            raise device.violation(f"{self.name} takes {len(params)} arguments, got "
                                   f"{len(args)}", TypeError)
        packed, accesses = [], []
        for i, (param, arg) in enumerate(zip(params, args)):
            try:
                value, ptr = _pointer_bytes(arg)
            except TypeError as exc:
                raise device.violation(f"{self.name}, argument {i}: {exc}", TypeError) from None
            if param.pointer and not (arg is None or isinstance(arg, (ndarray, MemoryPointer))):
                raise device.violation(f"argument {i} of {self.name} is a pointer ({param}) "
                                       f"but got {type(arg).__name__}", TypeError)
            if not param.pointer and ptr is not None:
                raise device.violation(f"argument {i} of {self.name} is {param} but got a "
                                       "device array", TypeError)
            if len(value) != param.size:
                # CUDA would read param.size bytes from the value's buffer: garbage or half
                raise device.violation(f"argument {i} of {self.name} is {param} "
                                       f"({param.size} bytes) but {type(arg).__name__} "
                                       f"passes {len(value)} bytes", TypeError)
            packed.append(value)
            if ptr is not None:
                accesses.append((ptr, "r" if param.const else "w"))
        state = (stream or rt.current())._state
        rt.stats["launches"] += 1
        rt.stats["kernels"][self.name] += 1
        device.enqueue(state, self.name, lambda: self._kernel.launch(grid3, block3, packed),
                       accesses)


# -- CuPy's cuBLAS wrapper (cupy_backends.cuda.libs.cublas) ----------------------------------
def cublas_set_stream(handle, stream):
    """``cublas.setStream``: CuPy 13-14 raise NotImplementedError while the stream is
    capturing (cupy_backends/cuda/libs/cublas.pyx), before any CUDA call, so the capture
    itself stays valid."""
    rt = _rt()
    state = rt.device.streams.get(int(stream))
    if state is not None and state.capture is not None:
        rt.device.violation("cuBLAS wrapper (setStream) called during stream capture")
        raise NotImplementedError("calling cuBLAS API during stream capture is currently "
                                  "unsupported")
    rt.cublas_stream[handle] = int(stream)


def _tf32(x):
    """float32 values rounded to TF32 (10 mantissa bits, to nearest, ties away from zero)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((bits.astype(np.uint64) + 0x1000) & 0xFFFFE000).astype(np.uint32)
    finite = np.isfinite(x)
    return np.where(finite, rounded.view(np.float32), x)


def matmul(a, b, out=None):
    """``cupy.matmul`` as cupy/_core/_routines_linalg.pyx does it: cuBLAS through CuPy's
    shared handle (``setStream`` first); a 3-D float16 product is computed in float32 on
    float32 copies of both operands and of the result."""
    rt = _rt()
    if not isinstance(a, ndarray) or not isinstance(b, ndarray):
        raise TypeError("matmul needs cupy arrays")
    ret = np.promote_types(a.dtype, b.dtype)
    handle = rt.cublas_handle
    if max(a.ndim, b.ndim) <= 2:
        c = out if out is not None and out.flags.c_contiguous and out.dtype == ret else \
            empty(a.shape[:-1] + b.shape[1:], ret)
        _gemm(rt, handle, a, b, c)
    else:
        dtype = np.dtype(np.float32) if ret.char == "e" else ret
        a, b = ascontiguousarray(a, dtype), ascontiguousarray(b, dtype)
        shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
        c = out if out is not None and out.flags.c_contiguous and out.dtype == dtype else \
            empty(shape, dtype)
        _gemm(rt, handle, a, b, c)
    if out is not None and c is not out:
        out[...] = c
        return out
    return c if c.dtype == ret else c.astype(ret)


def _gemm(rt, handle, a, b, c):
    cublas_set_stream(handle, rt.current().ptr)
    rt.stats["cublas_calls"] += 1
    rt.stats["matmul_k"].append(a.shape[-1])
    tf32 = rt.cublas_math[handle] == 3 and c.dtype == np.float32

    def run():
        x, y = a._host.astype(np.float32), b._host.astype(np.float32)
        if tf32:
            x, y = _tf32(x), _tf32(y)
        np.copyto(c._host, np.matmul(x, y), casting="unsafe")

    _enqueue("cuBLAS GEMM (CuPy's handle)", run,
             [(a._alloc.ptr, "r"), (b._alloc.ptr, "r"), (c._alloc.ptr, "w")])
