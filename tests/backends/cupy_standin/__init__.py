"""A test-only stand-in for the slice of CuPy that numres's CUDA backend uses, on the CPU.

Installed into ``sys.modules`` (as ``cupy``, ``cupy.cuda``, ``cupy.cuda.runtime``, ...) by the
``cupy_standin`` fixture, and only where the real CuPy cannot reach a GPU; the backend is then
imported afresh against it. Kernels are numres's own CUDA C, compiled for the host
(``tests/backends/cuda_host``); cuBLASLt is an emulation behind C function pointers
(``cublaslt.py``); device memory, streams, events and graph capture are ``device.py``'s.

It is as strict as the real thing, and stricter where the real thing is silently wrong.
Each rule, and where it comes from:

* A NumPy array of more than one element as a kernel argument is a ``TypeError``; size-one
  arrays pass their value, Python ints pass 8 bytes, floats 8 bytes, NumPy scalars their own
  size (``cupy/cuda/function.pyx``: ``_pointer``; ``cupy/_core/_scalar.pyx``). Stricter: an
  argument whose size differs from the kernel parameter's, or a non-pointer for a pointer
  parameter, is an error (CUDA would read garbage or half a value).
* Implicit conversion of a device array to NumPy is a ``TypeError``
  (``cupy/_core/core.pyx``: ``ndarray.__array__``); ``.get()`` copies and waits.
* ``cupy_backends.cuda.libs.cublas.setStream`` raises ``NotImplementedError`` while the stream
  is capturing, and every cuBLAS wrapper calls it first (CuPy 13-14,
  ``cupy_backends/cuda/libs/cublas.pyx``); so does ``cupy.matmul``, which also computes 3-D
  float16 products in float32 on float32 copies (``cupy/_core/_routines_linalg.pyx``).
* ``Stream.begin_capture`` refuses the legacy stream and defaults to the relaxed mode
  (``cupy/cuda/stream.pyx``). During a capture: a host synchronisation (stream, event, device,
  a device-to-host copy) is illegal and invalidates the capture, after which ``end_capture``
  raises (CUDA: cudaErrorStreamCaptureUnsupported, then cudaErrorStreamCaptureInvalidated); a
  capturing stream waiting on an event recorded outside the capture is illegal
  (cudaErrorStreamCaptureIsolation); in global or thread-local mode, work on the legacy stream
  from the capturing thread is illegal (cudaErrorStreamCaptureImplicit). Stricter: any
  allocation by a thread while it captures is an error (CuPy allows it; the block returns to
  the pool when its array dies while the graph keeps its address).
* Ordering: each operation names the buffers it reads and writes; one that is not ordered
  after the last conflicting access on another stream (by stream order, an event, a host
  synchronisation, or the legacy stream's implicit barrier with blocking streams) is a race.
* Graph replay checks that every buffer the graph touches is still allocated.
* cuBLASLt: see ``cublaslt.py``.

Every violation is also appended to ``runtime.device.violations``: the fixture fails a test
that leaves any behind, so code that swallows exceptions cannot hide one.
"""

import sys
import types

import numpy as np

from . import api
from .cublaslt import Library
from .device import CUDARuntimeError, Device, OutOfMemoryError, StandinError

__all__ = ["install", "CUDARuntimeError", "OutOfMemoryError", "StandinError"]


def _module(name, **attrs):
    module = types.ModuleType(name, f"numres test stand-in for {name}")
    module.__dict__.update(attrs)
    return module


def build_modules(runtime):
    """The stand-in's modules, by the names CuPy has them under."""
    device = runtime.device
    cuda_consts = dict(streamCaptureModeGlobal=0, streamCaptureModeThreadLocal=1,
                       streamCaptureModeRelaxed=2, streamCaptureStatusNone=0,
                       streamCaptureStatusActive=1, streamCaptureStatusInvalidated=2,
                       streamLegacy=1, streamPerThread=2, _is_hip_environment=False,
                       is_hip=False)

    def stream_is_capturing(ptr):
        state = device.streams.get(int(ptr))
        if state is None or state.capture is None:
            return 0
        return 2 if state.capture.invalid else 1

    runtime_mod = _module(
        "cupy.cuda.runtime", CUDARuntimeError=CUDARuntimeError,
        getDeviceCount=lambda: 1, getDevice=lambda: 0, setDevice=lambda i: api.Device(i),
        runtimeGetVersion=lambda: 13000, driverGetVersion=lambda: 13000,
        getDeviceProperties=lambda i: {"name": b"NVIDIA H200 (numres CPU stand-in)",
                                       "totalGlobalMem": device.total_bytes,
                                       "multiProcessorCount": 132, "major": 9, "minor": 0},
        deviceSynchronize=lambda: device.host_sync(what="device synchronize"),
        memGetInfo=lambda: api.Device().mem_info, streamIsCapturing=stream_is_capturing,
        **cuda_consts)
    device_mod = _module("cupy.cuda.device", Device=api.Device,
                         get_cublas_handle=lambda: runtime.cublas_handle,
                         get_device_id=lambda: 0)
    memory_mod = _module("cupy.cuda.memory", OutOfMemoryError=OutOfMemoryError,
                         MemoryPointer=api.MemoryPointer, MemoryPool=api.MemoryPool)
    graph_mod = _module("cupy.cuda.graph", Graph=api.Graph)
    stream_mod = _module("cupy.cuda.stream", Stream=api.Stream, Event=api.Event,
                         get_current_stream=api.get_current_stream)
    cuda = _module("cupy.cuda", runtime=runtime_mod, device=device_mod, memory=memory_mod,
                   graph=graph_mod, stream=stream_mod, Stream=api.Stream, Event=api.Event,
                   Device=api.Device, MemoryPointer=api.MemoryPointer,
                   get_current_stream=api.get_current_stream, is_available=lambda: True)

    def get_stream(handle):
        return runtime.cublas_stream[handle]

    def set_math_mode(handle, mode):
        runtime.cublas_math[handle] = int(mode)

    cublas = _module("cupy_backends.cuda.libs.cublas", setStream=api.cublas_set_stream,
                     getStream=get_stream, setMathMode=set_math_mode,
                     getMathMode=lambda handle: runtime.cublas_math[handle],
                     CUBLAS_DEFAULT_MATH=0, CUBLAS_TENSOR_OP_MATH=1, CUBLAS_PEDANTIC_MATH=2,
                     CUBLAS_TF32_TENSOR_OP_MATH=3)
    libs = _module("cupy_backends.cuda.libs", cublas=cublas)
    api_mod = _module("cupy_backends.cuda.api", runtime=runtime_mod)
    backends_cuda = _module("cupy_backends.cuda", libs=libs, api=api_mod)
    backends = _module("cupy_backends", cuda=backends_cuda)
    cupy = _module(
        "cupy", __version__="14.2.0+numres.standin", cuda=cuda, ndarray=api.ndarray,
        empty=api.empty, zeros=api.zeros, empty_like=api.empty_like,
        zeros_like=api.zeros_like, asarray=api.asarray, array=api.array,
        ascontiguousarray=api.ascontiguousarray, asnumpy=api.asnumpy, matmul=api.matmul,
        get_array_module=api.get_array_module, RawModule=api.RawModule,
        get_default_memory_pool=api.get_default_memory_pool, float16=np.float16,
        float32=np.float32, float64=np.float64, uint8=np.uint8, int32=np.int32,
        int64=np.int64, dtype=np.dtype)
    return {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.runtime": runtime_mod,
            "cupy.cuda.device": device_mod, "cupy.cuda.memory": memory_mod,
            "cupy.cuda.graph": graph_mod, "cupy.cuda.stream": stream_mod,
            "cupy_backends": backends, "cupy_backends.cuda": backends_cuda,
            "cupy_backends.cuda.api": api_mod, "cupy_backends.cuda.api.runtime": runtime_mod,
            "cupy_backends.cuda.libs": libs, "cupy_backends.cuda.libs.cublas": cublas}


class Installed:
    """What ``install`` returns: the runtime, its device, the emulated cuBLASLt, modules."""

    def __init__(self, runtime, modules, lt):
        self.runtime, self.device, self.modules, self.cublaslt = (runtime, runtime.device,
                                                                  modules, lt)
        self.cupy = modules["cupy"]


def install(monkeypatch, total_bytes=16 << 30):
    """Put the stand-in in ``sys.modules`` for one test (``monkeypatch`` undoes it all).

    Returns:
        :class:`Installed`.
    """
    runtime = api.Runtime(Device(total_bytes))
    monkeypatch.setattr(api, "RT", runtime)
    api.Stream.null = None
    runtime.null_stream = api.Stream(null=True)
    monkeypatch.setattr(api.Stream, "null", runtime.null_stream)
    modules = build_modules(runtime)
    for name in list(sys.modules):
        if name.split(".")[0] in ("cupy", "cupy_backends") or \
                name.startswith("numres.backends.cupy"):
            monkeypatch.delitem(sys.modules, name)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    lt = Library(runtime)
    return Installed(runtime, modules, lt)
