"""Reusable scratch buffers, safe across threads and against buffers that escape.

Allocating a fresh multi-megabyte array per layer costs page faults on every call. The pool
hands out a buffer only when nothing but the pool refers to it: the reference count tells,
so a buffer still held by the caller (a returned view, a feature map) is never reused. Any
free buffer large enough serves a request (the smallest such), so the early layers' large
buffers serve the later layers too and the pool's size follows the largest set of buffers
alive at once, not the sum over layers. Pools are per thread, so two threads calling one
model never share a buffer.
"""

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


def _aligned_view(raw, nbytes, align=64):
    start = -raw.ctypes.data % align if hasattr(raw, "ctypes") else 0
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
        local = self._local
        if getattr(local, "buffers", None) is None:
            local.buffers, local.sizes = [], []
        buffers, sizes = local.buffers, local.sizes
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        best = -1
        for i in range(len(buffers)):       # the smallest free buffer that fits
            if sizes[i] >= size and (best < 0 or sizes[i] < sizes[best]) \
                    and sys.getrefcount(buffers[i]) == _FREE:
                best = i
        if best >= 0:
            buf = buffers[best]
        else:
            buf = self._allocate(size)
            if len(buffers) < _MAX_BUFFERS:
                buffers.append(buf)
                sizes.append(size)
        return _aligned_view(buf, size).view(dtype).reshape(shape)

    def clear(self):
        """Drop this thread's buffers."""
        self._local.buffers = None
