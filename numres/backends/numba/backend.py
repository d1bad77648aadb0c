"""The Numba backend: NHWC activations, each convolution on the path ``paths.py`` chooses.

Layout choice: with channels last, a 1x1 convolution is one GEMM on the activation as it lies
in memory, ``(N*H*W, C) @ (C, O)``, and its result is already the next layer's NHWC input.
Where a convolution is computed: :meth:`NumbaBackend.conv2d` asks ``paths.choose_path``
for the path and runs ``paths.RUNNERS[path]``; each path's arithmetic is in its own module
(``gemm.py``, ``direct.py``, ``stem.py``, ``winograd.py``, ``grouped.py``, ``blas.py``),
the GEMM microkernel's IR in ``microkernel.py``. Bias, residual add and ReLU are applied
while each block is still in cache. Scratch buffers are reused across layers and calls
(``numres/backends/_workspace.py``).

Threads: each layer's work is shared by numres's threads (``threads.py``); BLAS, where it
runs, is single-threaded inside them or alone on its own threads, never both at once. The
first pass per input shape is recorded and later ones replay it (``replay.py``).
``NUMRES_NUM_THREADS``, else ``OMP_NUM_THREADS``, else every CPU of the process;
``NUMRES_NUM_THREADS`` also sets BLAS's count (through threadpoolctl).
"""

import contextlib
import functools
import hashlib
import os
import sys
import threading
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from .._base import (PRECISIONS, Backend, batch_norm_affine, compose_conv_pool,
                     conv_output_size, default_threads, nbytes, workspace_free_sizes)
from .._workspace import Workspace
from ...errors import BackendUnavailable
from . import background, gemm, kernels, pairs, replay, threads
from .paths import RUNNERS, ConvPath, choose_path, prepare
from .tile import AVAILABLE
from .threads import shared
from .tuning import Tuning


@dataclass
class BatchNorm:
    scale: np.ndarray
    shift: np.ndarray


@dataclass
class Linear:
    weight_t: np.ndarray    # (in, out)
    bias: np.ndarray


def _cache_index():
    """The index file of one kernel in Numba's on-disk cache, or None (a Numba without this
    internal layout)."""
    try:
        return gemm.conv_pixels._cache._cache_file._index_path
    except AttributeError:
        return None


@functools.lru_cache(maxsize=None)
def _warm_marker():
    """The file :func:`warmup` leaves in Numba's cache folder once every kernel is there,
    named for what Numba's cache entries depend on: this package's source files (size and
    time of each), the Python, Numba and numres versions and the CPU (or Numba's
    ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES``). None: no cache folder.

    Made once per process (the sources Numba compiled from do not change under it).

    Raises:
        OSError, RuntimeError: a source file vanished meanwhile, the CPU cannot be read.
    """
    import numba
    from llvmlite import binding as llvm_binding
    from ... import __version__
    index = _cache_index()
    if index is None:
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    stamps = []
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            st = os.stat(os.path.join(here, name))
            stamps.append((name, st.st_mtime_ns, st.st_size))
    key = repr((stamps, sys.version_info[:2], numba.__version__, __version__,
                numba.config.CPU_NAME or llvm_binding.get_host_cpu_name(),
                numba.config.CPU_FEATURES or llvm_binding.get_host_cpu_features().flatten()))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(os.path.dirname(index), f"numres-warm-{digest}")


def kernels_cached():
    """Whether this machine has every compiled kernel on disk: :func:`warmup` has run (in
    ``numres warmup``, or the background compile) since these sources and this Numba."""
    try:
        marker = _warm_marker()
    except (OSError, RuntimeError):
        return False
    return marker is None or os.path.exists(marker)


def _anything_cached():
    index = _cache_index()
    return index is None or os.path.exists(index)


_notice_lock = threading.Lock()
_noticed = False


def _compile_notice():
    global _noticed
    with _notice_lock:
        if _noticed or _anything_cached():
            return
        _noticed = True
    sys.stderr.write("numres: compiling the CPU kernels for this machine; this happens once "
                     "(20-30 s on 2 cores) and is cached. 'numres warmup' does it ahead.\n")


def warmup():
    """Compile (or load from cache) every kernel the backend uses, on tiny arrays, so that
    no later call pauses: each convolution path, the fused stem, Winograd, grouped
    convolution, unfolded batch norm, pooling, the layout change and the threads' hand-offs;
    then notes in the cache that all of them are there (:func:`kernels_cached`)."""
    with background.compiling_here():
        _warm_every_kernel()
    marker = _warm_marker()
    if marker is not None:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write("every numres kernel is in this cache (numres warmup)\n")


def _warm_every_kernel():
    threads.compile_handoffs()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 9, 9)).astype(np.float32)
    for be in (NumbaBackend(threads=1, winograd_min_tiles=0, winograd_min_tiles_wide=0),
               NumbaBackend(threads=1, own_gemm=False)):
        act = be.from_nchw(x)
        for k, s, p, g in ((1, 1, 0, 1), (1, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1),
                           (3, 1, 1, 4)):
            conv = be.prepare_conv(rng.standard_normal((8, 8 // g, k, k)).astype(np.float32),
                                   np.zeros(8, np.float32), s, p, g)
            out = be.conv2d(act, conv, relu=True)
            be.conv2d(act, conv, relu=False, residual=out if s == 1 else None)
        wide = be.from_nchw(rng.standard_normal((1, 16, 9, 9)).astype(np.float32))
        grouped = be.prepare_conv(np.ones((16, 4, 3, 3), np.float32), None, 1, 1, 4)
        be.conv2d(wide, grouped, relu=True)     # 4 channels per group: GROUPED_LANES
        stem = be.prepare_conv(np.zeros((8, 3, 7, 7), np.float32), None, 2, 3, 1)
        be.conv2d(be.from_nchw(x[:, :3]), stem, relu=True)
        be.conv2d_max_pool(be.from_nchw(x[:, :3]), stem, True, 3, 2, 1)
        ones = np.ones(8, np.float32)
        be.batch_norm(act, be.prepare_batch_norm(ones, ones, ones, ones, 1e-5), relu=True,
                      residual=act)
        be.max_pool2d(act, 3, 2, 1)
    if AVAILABLE and pairs.supported():
        try:
            _warm_pairs(rng)
        except Exception as exc:       # noqa: BLE001 - float32 must not fail with bf16
            warnings.warn(f"numres: the bfloat16 kernels did not compile ({exc}); "
                          "precision='bfloat16' will compile them when asked for",
                          RuntimeWarning)


def _warm_pairs(rng):
    """The bf16 kernels (``precision="bfloat16"``): GEMM on the input as it lies and
    gathered, direct on the padded input and on the input itself, grouped direct and the
    lanes kernel."""
    be = NumbaBackend(threads=1, precision="bfloat16")
    for size, k, s, p, g in ((9, 1, 1, 0, 1), (9, 3, 1, 1, 1), (28, 3, 2, 1, 1),
                             (28, 1, 2, 0, 1), (9, 3, 1, 1, 2), (9, 3, 1, 1, 8)):
        act = be.from_nchw(rng.standard_normal((1, 32, size, size)).astype(np.float32))
        conv = be.prepare_conv(rng.standard_normal((32, 32 // g, k, k)).astype(np.float32),
                               None, s, p, g)
        out = be.conv2d(act, conv, relu=True)
        be.conv2d(act, conv, relu=False, residual=out if s == 1 else None)


class NumbaBackend(Backend):
    """NHWC CPU backend. Activations are (N, H, W, C) float32 NumPy arrays.

    Args:
        threads: threads per layer (default: :func:`numres.backends.default_threads`).
        winograd: allow Winograd for stride-1 3x3 convolutions (``NUMRES_WINOGRAD=0`` too).
        replay: record the first pass per input shape and replay it later (``replay.py``;
            ``NUMRES_REPLAY=0`` too).
        precision: ``"float32"`` (default), or ``"bfloat16"``: convolutions multiply in
            bf16 with float32 sums (``pairs.py``) on CPUs with AVX512_BF16: about twice the
            multiply rate, outputs no longer within float32 rounding of torch's. Applies to
            convolutions with an even number of input channels (per group), at least 16
            when ungrouped (not the stem), and filling vectors of pairs on the grouped-lanes
            kernel; those never use Winograd. 64-channel groups (BLAS), the classifier and
            every activation stay float32. While this machine's kernels compile in the
            background (``background.py``), calls run on NumPy in float32.
        **tuning: overrides of :class:`~.tuning.Tuning` fields.

    Raises:
        ValueError: ``NUMRES_NUM_THREADS``/``OMP_NUM_THREADS`` is not an integer, an
            unknown ``precision``, or bfloat16 with ``own_gemm=False`` (BLAS is float32).
        BackendUnavailable: ``precision="bfloat16"`` on a CPU without AVX512_BF16 (or with
            Numba compiling for one: ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES``).
        TypeError: an unknown tuning field.

    Example:
        >>> be = NumbaBackend(precision="bfloat16")          # doctest: +SKIP
        >>> model = numres.resnet50(pretrained=True, backend=be)   # doctest: +SKIP
    """

    name = "numba"

    def __init__(self, threads=None, winograd=True, replay=True, precision="float32",
                 **tuning):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "bfloat16" and not (AVAILABLE and pairs.supported()):
            raise BackendUnavailable(
                "precision='bfloat16' needs a CPU with AVX512_BF16 (vdpbf16ps), and Numba "
                "compiling for it; this one has none: use precision='float32'")
        self.precision = precision
        self.tuning = Tuning(**tuning)
        if precision == "bfloat16" and not self.tuning.own_gemm:
            raise ValueError("precision='bfloat16' runs on numres's own kernels; "
                             "own_gemm=False multiplies with BLAS, in float32")
        self.replay = replay and os.environ.get("NUMRES_REPLAY", "1") != "0"
        self._recording = threading.local()
        self._batch_hint = threading.local()   # as_batch(n): choices made for n images
        threads = threads or default_threads()
        if os.environ.get("NUMRES_NUM_THREADS"):
            _limit_blas_threads(threads)
        self.winograd = winograd and os.environ.get("NUMRES_WINOGRAD", "1") != "0"
        self.threads = threads
        self._executor = None
        self.workspace = Workspace()
        if not kernels_cached() and not (background.enabled() and background.start()):
            _compile_notice()

    def with_threads(self, threads):
        """A backend like this one (precision, Winograd, replay, tuning) on ``threads``
        threads."""
        return NumbaBackend(threads=threads, winograd=self.winograd, replay=self.replay,
                            precision=self.precision, **asdict(self.tuning))

    @property
    def executor(self):
        """The process's :class:`~.threads.Executor` for this backend's thread count, made
        at first use (its threads compile two small kernels: not while NumPy stands in)."""
        if self._executor is None:
            self._executor = shared(self.threads)
        return self._executor

    def stand_in(self):
        """The NumPy backend while this machine's kernels compile in the background
        (``background.py``), else None."""
        return background.stand_in()

    # -- data movement ---------------------------------------------------------------------
    def from_nchw(self, x):
        n, c, h, w = x.shape
        out = self.workspace.get((n, h, w, c))
        self.step(self._from_nchw, x, out)
        return out

    def _from_nchw(self, x, out):
        x = np.ascontiguousarray(x, np.float32)
        self.rows(x.shape[0] * x.shape[2], out.size, kernels.nchw_to_nhwc, x, out)

    def to_nchw(self, act):
        n, h, w, c = act.shape
        out = self.workspace.get((n, c, h, w))
        self.step(_copy_nchw, act, out)
        return out

    def to_numpy(self, array):
        # Results may live in the workspace; hand out a copy the pool will never reuse.
        return np.array(array, copy=True)

    # -- weights ---------------------------------------------------------------------------
    def prepare_conv(self, weight, bias, stride, padding, groups):
        return prepare(weight, bias, stride, padding, groups, self.tuning, self.winograd,
                       bf16=self.precision == "bfloat16")

    def prepare_batch_norm(self, mean, var, weight, bias, eps):
        scale, shift = batch_norm_affine(mean, var, weight, bias, eps)
        return BatchNorm(scale.astype(np.float32), shift.astype(np.float32))

    def prepare_linear(self, weight, bias):
        return Linear(np.ascontiguousarray(weight.T, np.float32), np.asarray(bias, np.float32))

    # -- operations ------------------------------------------------------------------------
    def conv_path(self, x_shape, conv, pooled=False):
        """The :class:`~.paths.ConvPath` ``conv`` takes on an NHWC input of ``x_shape``
        (``pooled``: followed by a max pool, as in :meth:`conv2d_max_pool`)."""
        batch = getattr(self._batch_hint, "n", None) or x_shape[0]
        return choose_path(conv, x_shape, batch, self.tuning, pooled)

    def conv2d(self, x, conv, relu=False, residual=None):
        n, h, w, _ = x.shape
        k, s, p = conv.kernel_size, conv.stride, conv.padding
        out_h, out_w = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
        o = conv.out_channels
        y = self.workspace.get((n, out_h, out_w, o))
        rows = None if residual is None else residual.reshape(n * out_h * out_w, o)  # (M, O)
        path = self.conv_path(x.shape, conv)
        RUNNERS[path].run(self, x, conv, kernels.epilogue(conv.bias, rows, relu), y)
        return y

    def conv2d_max_pool(self, x, conv, relu, kernel_size, stride, padding):
        """The convolution fused with its max pool (path ``STEM``) where it runs as a direct
        convolution (ResNet's stem); otherwise the two ops in turn."""
        if self.conv_path(x.shape, conv, pooled=True) is not ConvPath.STEM:
            return super().conv2d_max_pool(x, conv, relu, kernel_size, stride, padding)
        n, h, w, _ = x.shape
        k, s, p = conv.kernel_size, conv.stride, conv.padding
        out_h, out_w = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
        pool_h = conv_output_size(out_h, kernel_size, stride, padding)
        pool_w = conv_output_size(out_w, kernel_size, stride, padding)
        out = self.workspace.get((n, pool_h, pool_w, conv.out_channels))
        RUNNERS[ConvPath.STEM].run(self, x, conv, kernels.epilogue(conv.bias, None, relu),
                                   out, (kernel_size, stride, padding))
        return out

    def batch_norm(self, x, bn, relu=False, residual=None):
        n, h, w, c = x.shape
        m = n * h * w
        out = self.workspace.get(x.shape)
        res = None if residual is None else residual.reshape(m, c)     # (M, C) rows
        self.step(self.rows, m, out.size, kernels.batch_norm, x.reshape(m, c), bn.scale,
                  kernels.epilogue(bn.shift, res, relu), out.reshape(m, c))
        return out

    def max_pool2d(self, x, kernel_size, stride, padding):
        n, h, w, c = x.shape
        out_h = conv_output_size(h, kernel_size, stride, padding)
        out_w = conv_output_size(w, kernel_size, stride, padding)
        out = self.workspace.get((n, out_h, out_w, c))
        self.step(self.rows, n * out_h, out.size, kernels.max_pool, x, kernel_size, stride,
                  padding, out)
        return out

    def global_avg_pool(self, x):
        n, h, w, c = x.shape
        out = self.workspace.get((n, c))
        # (N, H, W, C) -> (N, H*W, C)
        self.step(kernels.mean_pixels, 0, n, x.reshape(n, h * w, c), out)
        return out

    def linear(self, x, fc):
        out = self.workspace.get((x.shape[0], fc.weight_t.shape[1]))
        self.step(_linear, x, fc.weight_t, fc.bias, out)
        return out

    def rows(self, rows, work, kernel, *args):
        """Run ``kernel(r0, r1, *args)`` over ``[0, rows)``, split across threads where there
        is enough ``work`` (elements)."""
        if work < self.tuning.parallel_min_elements:
            kernel(0, rows, *args)
        else:
            self.executor.run(rows, lambda r0, r1: kernel(r0, r1, *args))

    # -- memory ----------------------------------------------------------------------------
    allocator = "pool"

    @property
    def keeps_buffers_per_shape(self):
        return self.replay

    @contextlib.contextmanager
    def as_batch(self, n):
        """Winograd's choice depends on the batch's tile count: made here as for ``n``
        images (in this thread), so chunks of a batch compute what the batch would."""
        previous = getattr(self._batch_hint, "n", None)
        self._batch_hint.n = n
        try:
            yield
        finally:
            self._batch_hint.n = previous

    def reusable_buffers(self, cache, key):
        plan = cache.get(key) if self.replay else None
        if isinstance(plan, replay.Plan) and not plan.lock.locked():
            return None
        return workspace_free_sizes(self.workspace)

    def memory_events(self, op):
        """The workspace buffers, thread scratch and lazily made Winograd filters of each
        op; a convolution's come from the runner of the path it takes (``paths.RUNNERS``)."""
        # The configured count, not the executor's (made at first use; at most as many).
        threads = self.threads
        if op.kind == "input":
            n, c, h, w = op.x
            return [("alloc", "out", nbytes((n, h, w, c)))]
        if op.kind in ("conv", "conv_pool"):
            n, c, h, w = op.x
            _, o, oh, ow = op.y
            x, y = (n, h, w, c), (n, oh, ow, o)          # NHWC, as the kernels see them
            out = [("alloc", "out", nbytes(y))]
            if op.kind == "conv":
                path = choose_path(op.conv, x, op.batch or n, self.tuning)
                return out + RUNNERS[path].events(op.conv, x, y, threads, self.tuning)
            if choose_path(op.conv, x, op.batch or n, self.tuning, pooled=True) \
                    is not ConvPath.STEM:
                return compose_conv_pool(self, op)
            return out + RUNNERS[ConvPath.STEM].events(op.conv, x, y, threads, self.tuning,
                                                       op.pool)
        if op.kind == "output":
            # A recorded or replayed pass copies its results (copy_tree), to_numpy again.
            copies = 2 if self.replay else 1
            return [("heap", f"result{i}.{j}", nbytes(shape))
                    for i, shape in enumerate(op.results) for j in range(copies)]
        return [("alloc", "out", nbytes(op.y))]

    # -- recorded passes -------------------------------------------------------------------
    def execute(self, cache, key, fn, x):
        """Run a forward pass ``fn(x)``: the first for an input shape is recorded, later ones
        replay it (``replay.py``). At most ``tuning.max_plans`` shapes per model are kept; a
        plan in use by another thread, or a pass that could not be recorded, runs as usual."""
        with self.executor.placed(), self.executor.single_threaded_blas():
            if not self.replay or self.observing:
                return fn(x)
            plan = cache.get(key)
            if plan is None:
                if len(cache) >= self.tuning.max_plans \
                        or getattr(self._recording, "now", None) is not None:
                    return fn(x)
                return self._record(cache, key, fn, x)
            if plan == "eager" or not plan.lock.acquire(blocking=False):
                return fn(x)
            try:
                return plan.replay(x)
            finally:
                plan.lock.release()

    def _record(self, cache, key, fn, x):
        recorder = replay.Recorder(x, self.workspace.owner_ids)
        self._recording.now = recorder
        try:
            out = fn(x)
            noted = replay.portable_output(recorder, out)
        finally:
            self._recording.now = None
        try:
            plan = replay.Plan(recorder, noted)
        except replay.NotReplayable:
            plan = "eager"
        cache[key] = plan
        # The plan now owns these buffers: a copy, so a replay cannot overwrite a result
        # before the caller has it.
        return replay.copy_tree(out)

    def step(self, fn, *args):
        """Run ``fn(*args)``, one step of a pass, noting it when a pass is being recorded."""
        recorder = getattr(self._recording, "now", None)
        if recorder is None or recorder.inside:
            fn(*args)
            return
        recorder.add(fn, args)
        recorder.inside = True
        try:
            fn(*args)
        finally:
            recorder.inside = False


def _copy_nchw(act, out):
    np.copyto(out, act.transpose(0, 3, 1, 2))      # (N, H, W, C) -> (N, C, H, W)


def _linear(x, weight_t, bias, out):
    np.matmul(x, weight_t, out=out)
    out += bias


def _limit_blas_threads(n):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(n, user_api="blas")
