"""The backend boundary: the handful of array operations a ResNet needs, and the facts every
backend shares (output sizes, batch-norm folding, the GEMM weight layout, thread counts).

Models call only these methods. A backend chooses its own activation layout and array type
(NumPy NCHW, NumPy NHWC, CuPy ...); activations are opaque to the model between calls.
Weights arrive as float32 NumPy arrays once, through the ``prepare_*`` methods, and the
backend keeps them in whatever form suits it. Public names are re-exported by
:mod:`numres.backends`; import them from there.
"""

import abc
import contextlib
import functools
import math
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

#: The operations :meth:`Backend.observe` reports, as models call them.
OBSERVED_OPS = ("from_nchw", "to_nchw", "conv2d", "conv2d_max_pool", "batch_norm", "max_pool2d",
                "global_avg_pool", "linear")


class Backend(abc.ABC):
    """Interface every backend implements. See :mod:`numres.backends.numpy_backend`."""

    #: Name used in ``backend=`` arguments.
    name = "base"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in OBSERVED_OPS:             # each backend's ops report to observe()
            method = cls.__dict__.get(name)
            if method is not None and not hasattr(method, "observed_op"):
                setattr(cls, name, _observable(name, method))

    #: Whether ``prepare_*`` keeps copies of the arrays it is given (folded, packed, on a
    #: device), so that the caller's arrays (a checkpoint file's pages) are no longer needed
    #: once a model has prepared its weights. False where it may keep views of them (the
    #: NumPy backend's unfolded batch norm).
    copies_weights = True

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

    def stand_in(self):
        """The backend a model's call runs on instead while this one cannot run yet (the
        Numba backend on a machine whose kernels are still compiling in the background), or
        None: this one. Asked once per call; a model switches between calls."""
        return None

    # -- observing (per-layer timing) ------------------------------------------------------
    _observer = None

    @property
    def observing(self):
        """Whether :meth:`observe` is active: passes then run op by op (no replay)."""
        return self._observer is not None

    @contextlib.contextmanager
    def observe(self, callback):
        """Context manager: report every op this backend runs meanwhile (in any thread) as
        ``callback(op, args, kwargs, seconds)``, ``op`` one of :data:`OBSERVED_OPS` and
        ``seconds`` its wall time between device synchronisations. Ops an op calls itself
        (``conv2d_max_pool`` made of ``conv2d`` and ``max_pool2d``) are not reported apart.
        Recorded or captured passes are not replayed while observed, so that every op runs.

        Raises:
            RuntimeError: already observed.
        """
        if self._observer is not None:
            raise RuntimeError("this backend is already being observed")
        self._observer = (callback, threading.local())
        try:
            yield self
        finally:
            self._observer = None

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


def _observable(name, method):
    """``method`` reporting to :meth:`Backend.observe` while it is active (one attribute test
    otherwise)."""
    @functools.wraps(method)
    def op(self, *args, **kwargs):
        observer = self._observer
        if observer is None:
            return method(self, *args, **kwargs)
        callback, local = observer
        if getattr(local, "inside", False):
            return method(self, *args, **kwargs)
        local.inside = True
        try:
            self.synchronize()
            start = time.perf_counter()
            result = method(self, *args, **kwargs)
            self.synchronize()
            seconds = time.perf_counter() - start
        finally:
            local.inside = False
        callback(name, args, kwargs, seconds)
        return result
    op.observed_op = name
    return op


#: What a backend may compute convolutions in (``precision=``): float32 everywhere; bfloat16
#: on the Numba backend, on CPUs with AVX512_BF16 (``numba/pairs.py``).
PRECISIONS = ("float32", "bfloat16")


def conv_output_size(size, kernel, stride, padding):
    """Floor-mode output length of a convolution or pooling window, as torch computes it.

    Args:
        size: input length (height or width).
        kernel, stride, padding: the window's geometry along that axis.

    Returns:
        int: the output length.

    Example:
        >>> conv_output_size(224, 7, 2, 3)
        112
    """
    return (size + 2 * padding - kernel) // stride + 1


def batch_norm_affine(mean, var, weight, bias, eps):
    """Inference batch norm as ``y = x * scale + shift``, computed in float64.

    The one place the folding is written: models fold it into convolution weights
    (``W * scale``, bias ``shift``), backends apply it unfolded.

    Args:
        mean, var, weight, bias: per-channel running statistics and affine parameters.
        eps: added to the variance.

    Returns:
        ``(scale, shift)`` float64 arrays.
    """
    scale = np.asarray(weight, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    shift = np.asarray(bias, np.float64) - np.asarray(mean, np.float64) * scale
    return scale, shift


def conv_weight_matrix(weight, groups=1):
    """Convolution weights as GEMM operands whose rows follow an NHWC im2col's (ky, kx, c)
    order.

    Args:
        weight: (O, C/groups, kh, kw) array (NumPy, or any array with ``reshape`` and
            ``transpose``).
        groups: channel groups.

    Returns:
        ``(kh * kw * C, O)`` for one group; ``(G, kh * kw * C/G, O/G)`` per group.
    """
    o, cg, kh, kw = weight.shape
    if groups == 1:
        # (O, C, kh, kw) -> (kh, kw, C, O)
        return weight.transpose(2, 3, 1, 0).reshape(kh * kw * cg, o)
    # (G, O/G, Cg, kh, kw) -> (G, kh, kw, Cg, O/G)
    w = weight.reshape(groups, o // groups, cg, kh, kw).transpose(0, 3, 4, 2, 1)
    return w.reshape(groups, kh * kw * cg, o // groups)


def available_cores():
    """CPUs this process may run on (its affinity where the OS tells, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads():
    """Threads a CPU backend uses by default: ``NUMRES_NUM_THREADS``, else
    ``OMP_NUM_THREADS``, else :func:`available_cores`.

    Raises:
        ValueError: one of the variables is set but not an integer.
    """
    for var in ("NUMRES_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var)
        if value:
            try:
                return max(1, int(value.split(",")[0]))
            except ValueError:
                raise ValueError(f"{var} must be an integer, got {value!r}") from None
    return available_cores()


def copy_tree(out):
    """Copies of a pass's results, an array or a dict of them (what a recorded or captured
    pass hands out: its own buffers are overwritten by the next replay)."""
    if isinstance(out, dict):
        return {k: v.copy() for k, v in out.items()}
    return out.copy()


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
    """Sizes of the free buffers in the calling thread's ``_workspace.Workspace`` pool
    (:meth:`~numres.backends._workspace.Workspace.free_sizes`)."""
    return workspace.free_sizes()
