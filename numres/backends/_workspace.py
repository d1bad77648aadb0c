"""Reusable scratch buffers, safe across threads and against buffers that escape.

Allocating a fresh multi-megabyte array per layer costs page faults on every call. The pool
hands out a buffer only when nothing but the pool refers to it: the reference count tells,
so a buffer still held by the caller (a returned view, a feature map) is never reused. Any
free buffer large enough serves a request (the smallest such), so the early layers' large
buffers serve the later layers too and the pool's size follows the largest set of buffers
alive at once, not the sum over layers. Pools are per thread, so two threads calling one
model never share a buffer.
"""

import math
import sys
import threading

import numpy as np

# Most buffers kept per thread; beyond it a request is served by a plain allocation.
_MAX_BUFFERS = 64
_SLACK = 64   # bytes allocated beyond each request, to align its start to a cache line


def aligned_empty(shape, dtype=np.float32, align=64):
    """An uninitialised array whose data starts on an ``align``-byte boundary (a cache line:
    64-byte vector loads that straddle two lines run at half speed)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return _aligned_view(np.empty(nbytes + align, np.uint8), nbytes, align).view(
        dtype).reshape(shape)


def _misalignment(raw, align=64):
    """Bytes to skip from the start of ``raw`` to reach an ``align``-byte boundary."""
    return -raw.ctypes.data % align if hasattr(raw, "ctypes") else 0


def _aligned_view(raw, nbytes, align=64):
    start = _misalignment(raw, align)
    return raw[start:start + nbytes]


def _baseline_refcount():
    # References held while the pool inspects an entry: the pool's list and the argument.
    probe = [np.empty(1)]
    return sys.getrefcount(probe[0])


_FREE = _baseline_refcount()


class Workspace:
    """``get(shape, dtype)`` returns an array that no one else references.

    Args:
        allocate: ``nbytes -> 1-D uint8 array`` (NumPy by default; the CUDA backend passes
            a CuPy allocator).
    """

    def __init__(self, allocate=None):
        # Returns the buffer that owns its memory: views handed out keep it as their .base,
        # which is what the reference count below sees.
        self._allocate = allocate or (lambda nbytes: np.empty(nbytes + _SLACK, np.uint8))
        self._local = threading.local()

    def get(self, shape, dtype=np.float32):
        buf = self._get(shape, dtype)
        tracking = getattr(self._local, "tracking", None)
        if tracking is not None:
            tracking.append(buf.base if buf.base is not None else buf)
        return buf

    def track(self):
        """Start recording every buffer handed out by this thread; ``untrack()`` returns them
        (a CUDA graph holds on to the buffers it was captured with)."""
        self._local.tracking = []

    def untrack(self):
        tracked, self._local.tracking = getattr(self._local, "tracking", None) or [], None
        return tracked

    def _get(self, shape, dtype):
        # Called several times per layer: kept to plain Python on small lists (~2 us).
        local = self._local
        try:
            buffers, sizes, starts = local.buffers, local.sizes, local.starts
        except AttributeError:
            buffers, sizes, starts = local.buffers, local.sizes, local.starts = [], [], []
        dtype = np.dtype(dtype)
        size = math.prod(shape) * dtype.itemsize
        best = -1
        best_size = 0
        for i, have in enumerate(sizes):       # the smallest free buffer that fits
            if have >= size and (best < 0 or have < best_size) \
                    and sys.getrefcount(buffers[i]) == _FREE:
                best, best_size = i, have
        if best >= 0:
            buf, start = buffers[best], starts[best]
        else:
            buf = self._allocate(size)
            start = _misalignment(buf)
            if len(buffers) < _MAX_BUFFERS:
                buffers.append(buf)
                sizes.append(size)
                starts.append(start)
        return buf[start:start + size].view(dtype).reshape(shape)

    def owner_ids(self):
        """ids of the memory blocks this thread's pool hands out views of (the Numba
        backend's recorded passes)."""
        return {id(buf) for buf in getattr(self._local, "buffers", ())}

    def free_sizes(self):
        """Sizes of the buffers in this thread's pool that nothing but the pool refers to
        (what the next pass may reuse): the test :meth:`get` makes."""
        local = self._local
        buffers, sizes = getattr(local, "buffers", ()), getattr(local, "sizes", ())
        return [sizes[i] for i in range(len(buffers)) if sys.getrefcount(buffers[i]) == _FREE]


_scratch = threading.local()


def thread_scratch(slot, shape, dtype=np.float32):
    """This thread's private array ``slot`` of ``shape`` float32 (or another 4-byte
    ``dtype``), for data that lives only within one kernel call (a thread's im2col block,
    its GEMM tile): no pool search, just a buffer per thread that grows to the largest
    request and is reused."""
    size = math.prod(shape)
    buf = getattr(_scratch, slot, None)
    if buf is None or buf.size < size:
        buf = aligned_empty((size,))
        setattr(_scratch, slot, buf)
    return buf[:size].view(dtype).reshape(shape)
