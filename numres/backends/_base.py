"""The backend boundary: the handful of array operations a ResNet needs.

Models call only these methods. A backend chooses its own activation layout and array type
(NumPy NCHW, NumPy NHWC, CuPy ...); activations are opaque to the model between calls.
Weights arrive as float32 NumPy arrays once, through the ``prepare_*`` methods, and the
backend keeps them in whatever form suits it.
"""

import abc
import contextlib
import math
import sys
from dataclasses import dataclass

import numpy as np


class Backend(abc.ABC):
    """Interface every backend implements. See :mod:`numres.backends.numpy_backend`."""

    #: Name used in ``backend=`` arguments.
    name = "base"

    # -- data movement ---------------------------------------------------------------------
    @abc.abstractmethod
    def from_nchw(self, x):
        """Take a validated float32 (N, C, H, W) array (NumPy, or the backend's own array
        type) and return the backend's activation."""

    @abc.abstractmethod
    def to_nchw(self, act):
        """Return an activation as a new (N, C, H, W) array of the backend's array type."""

    def to_device(self, x):
        """Move a validated float32 NCHW input to where the backend computes (default: as is)."""
        return x

    def to_numpy(self, array):
        """Return a backend array (any shape) as a NumPy array."""
        return np.asarray(array)

    def owns(self, x):
        """True when ``x`` is the backend's own device array type (results then stay there)."""
        return False

    # -- weights ---------------------------------------------------------------------------
    @abc.abstractmethod
    def prepare_conv(self, weight, bias, stride, padding, groups):
        """Take weights (O, I/groups, kh, kw) and optional bias (O,) once, at load time."""

    @abc.abstractmethod
    def prepare_batch_norm(self, mean, var, weight, bias, eps):
        """Take batch-norm statistics for the unfolded (reference) path."""

    @abc.abstractmethod
    def prepare_linear(self, weight, bias):
        """Take a fully connected layer: ``weight`` (out, in), ``bias`` (out,)."""

    # -- operations ------------------------------------------------------------------------
    @abc.abstractmethod
    def conv2d(self, x, conv, relu=False, residual=None):
        """``relu(conv(x) + bias + residual)``; the epilogue is fused where the backend can."""

    @abc.abstractmethod
    def batch_norm(self, x, bn, relu=False, residual=None):
        """``relu(batch_norm(x) + residual)`` for the unfolded path."""

    @abc.abstractmethod
    def max_pool2d(self, x, kernel_size, stride, padding):
        """Max pooling, floor output size, padding never chosen (as torch's -inf padding)."""

    def conv2d_max_pool(self, x, conv, relu, kernel_size, stride, padding):
        """``max_pool2d(conv2d(x, conv, relu=relu), ...)`` (ResNet's stem); backends may fuse
        the two so the convolution's full output is never stored."""
        return self.max_pool2d(self.conv2d(x, conv, relu=relu), kernel_size, stride, padding)

    @abc.abstractmethod
    def global_avg_pool(self, x):
        """Adaptive average pooling to 1x1, flattened: returns (N, C)."""

    @abc.abstractmethod
    def linear(self, x, fc):
        """``x @ weight.T + bias`` on an (N, in) array."""

    def execute(self, cache, key, fn, x):
        """Run a whole forward pass ``fn(x)``. Device backends may capture and replay it
        (``cache`` is a dict that lives as long as the model's prepared weights)."""
        return fn(x)

    def synchronize(self):
        """Wait for queued device work (a no-op on the CPU)."""

    # -- memory (``numres.models.memory`` walks a pass and asks these) ---------------------
    #: Where "alloc" events (:meth:`memory_events`) come from: ``"malloc"`` (NumPy arrays,
    #: freed when the last reference goes) or ``"pool"`` (``_workspace.Workspace``: kept, and
    #: reused by later requests that fit).
    allocator = "malloc"

    #: Whether :meth:`execute` keeps buffers per input shape (recorded passes, CUDA graphs):
    #: a batch run in chunks then pads its last chunk to the others' shape, so that one
    #: shape's buffers serve every chunk.
    keeps_buffers_per_shape = False

    def memory_events(self, op):
        """What :class:`PassOp` ``op`` allocates, in order, beyond its inputs (which the
        caller holds): a list of events, each one of

        * ``("alloc", name, nbytes)``: a buffer from the backend's :attr:`allocator`; the
          op's result is the buffer named ``"out"``;
        * ``("heap", name, nbytes)``: a plain allocation outside any pool (kept for good if
          never freed, e.g. weights transformed on first use);
        * ``("free", name)``: that buffer is released;
        * ``("scratch", slot, nbytes)``: per-thread scratch that grows to its largest request
          and is kept (``nbytes`` summed over the threads that use it).

        Sizes are bytes. This default is a safe guess for an unknown backend: every output
        new, a convolution's im2col matrix as a temporary, the result copied once.
        """
        if op.kind == "conv_pool":
            return compose_conv_pool(self, op)
        if op.kind == "output":
            return [("heap", f"result{i}", nbytes(shape))
                    for i, shape in enumerate(op.results)]
        events = [("alloc", "out", nbytes(op.y))]
        if op.kind == "conv":
            n, c, _, _ = op.x
            _, _, oh, ow = op.y
            events += [("alloc", "im2col", nbytes((n * oh * ow, c * op.kernel ** 2))),
                       ("free", "im2col")]
        return events

    def reusable_buffers(self, cache, key):
        """What a pass for ``key`` (see :meth:`execute`) can reuse of what the backend holds:
        ``None`` when it would replay a recorded pass on buffers already allocated (then it
        allocates only its result copies), else the sizes of the free buffers in the calling
        thread's pool (empty without a pool)."""
        return ()

    def device_memory(self):
        """``(free bytes, description)`` of the device memory a pass draws on, or ``None``
        when the pass runs in host memory (numres then reads the process's limits)."""
        return None

    def as_batch(self, n):
        """Context manager: make every batch-size-dependent choice (the algorithm of a layer)
        as for a batch of ``n``. A batch run in chunks of ``n`` images then computes exactly
        what the whole batch would. Default: no such choices, nothing to do."""
        return contextlib.nullcontext()


def conv_output_size(size, kernel, stride, padding):
    """Floor-mode output length, as torch computes it."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class PassOp:
    """One operation of a forward pass, as the memory estimate (``numres.models.memory``)
    describes it to a backend. Shapes are logical NCHW, whatever the backend's layout.

    ``kind`` is one of ``"input"`` (the validated float32 batch ``x`` to the backend's first
    activation ``y``: ``to_device`` + ``from_nchw``), ``"conv"``, ``"conv_pool"`` (the stem:
    ``conv2d_max_pool``, ``pool`` = (kernel, stride, padding)), ``"batch_norm"``,
    ``"max_pool"``, ``"avg_pool"``, ``"linear"`` ((N, in) -> (N, out)), ``"to_nchw"`` and
    ``"output"`` (what :meth:`Backend.execute` and ``to_numpy`` copy of the ``results``).
    ``conv`` is the backend's prepared convolution; ``batch`` the batch size its choices are
    made for (:meth:`Backend.as_batch`).
    """

    kind: str
    x: tuple = ()
    y: tuple = ()
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    conv: object = None
    residual: bool = False
    pool: tuple = None
    batch: int = 0
    results: tuple = ()

    def conv_shape(self):
        """(N, O, oh, ow) of the convolution itself (before a ``conv_pool``'s pooling)."""
        n, _, h, w = self.x
        k, s, p = self.kernel, self.stride, self.padding
        return (n, self.y[1], conv_output_size(h, k, s, p), conv_output_size(w, k, s, p))


def nbytes(shape, itemsize=4):
    """Bytes of an array of ``shape`` (float32 unless told)."""
    return math.prod(shape) * itemsize


def compose_conv_pool(backend, op):
    """``memory_events`` of a stem run as ``conv2d`` then ``max_pool2d`` (no fusion)."""
    mid = op.conv_shape()
    conv = backend.memory_events(PassOp("conv", op.x, mid, op.kernel, op.stride, op.padding,
                                        op.groups, op.conv, batch=op.batch))
    k, s, p = op.pool
    pool = backend.memory_events(PassOp("max_pool", mid, op.y, k, s, p, batch=op.batch))
    return (_renamed(conv, "conv.", "conv.out") + _renamed(pool, "pool.", "out")
            + [("free", "conv.out")])


def _renamed(events, prefix, out):
    """Events with their buffer names prefixed, ``"out"`` renamed to ``out``."""
    renamed = []
    for event in events:
        kind, name = event[0], event[1]
        if kind != "scratch":
            name = out if name == "out" else prefix + name
        renamed.append((kind, name) + tuple(event[2:]))
    return renamed


def workspace_free_sizes(workspace):
    """Sizes of the buffers in the calling thread's ``_workspace.Workspace`` pool that nothing
    but the pool refers to (what the next pass may reuse). Reads the pool's private lists:
    both live in this package."""
    from ._workspace import _FREE
    local = workspace._local
    buffers, sizes = getattr(local, "buffers", ()), getattr(local, "sizes", ())
    # The pool's own test, word for word: the list and the argument are the references.
    return [sizes[i] for i in range(len(buffers)) if sys.getrefcount(buffers[i]) == _FREE]
