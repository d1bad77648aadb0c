"""numres's threads: each layer's work shared out once, BLAS single-threaded inside them.

Why not Numba's ``parallel=True`` plus multi-threaded BLAS: the two take turns layer by
layer, and OpenMP workers spin after each region, taking the cores from the BLAS threads
that run next. Instead every layer is handed once to this module's threads
(:meth:`Executor.run` splits a range; :meth:`Executor.share` lets kernels claim their blocks
themselves with :func:`next_block`); each thread gathers its block of input, multiplies on
one core (OpenBLAS's per-thread setting) and applies the epilogue while the block is still in
cache. Idle workers block on a lock and cost nothing.

Why the hand-off is a plain lock per worker: at batch 1 a layer takes well under a
millisecond, and a pool's futures, queue and condition variables cost several times more per
hand-off; workers that spun before blocking were no faster, and handing out chunks in Python
(one GIL round trip each) was slower on whole networks (figures:
``benchmarks/results/numba-design.md``). A run already in progress (another Python thread
calling a model, or a kernel that splits its own work) makes a second ``run`` execute in its
caller's thread, so threads are never oversubscribed and nothing deadlocks.

Where NumPy's BLAS cannot be limited per thread (not OpenBLAS >= 0.3.27), ``Executor`` runs
everything in the calling thread and lets BLAS use its own threads.
"""

import contextlib
import ctypes
import os
import threading
import weakref

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .kernels import helper


def _openblas_local_setter():
    """``openblas_set_num_threads_local`` of the OpenBLAS NumPy uses, or None."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    for lib in threadpool_info():
        if lib.get("internal_api") != "openblas":
            continue
        try:
            handle = ctypes.CDLL(lib["filepath"])
        except OSError:
            continue
        for prefix in ("", "scipy_"):
            fn = getattr(handle, prefix + "openblas_set_num_threads_local", None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                return fn
    return None


class _Worker:
    """One thread that runs ``fn(start, stop)`` each time :meth:`start` hands it a range."""

    def __init__(self, name, set_local):
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._job = None
        self._error = None
        self._set_local = set_local
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _loop(self):
        self._set_local(1)
        while True:
            self._go.acquire()
            fn, start, stop = self._job
            try:
                fn(start, stop)
            except BaseException as exc:  # noqa: BLE001  (re-raised in the caller)
                self._error = exc
            # Drop the job now, not at the next one: it holds the layer's buffers, which the
            # workspace may only reuse once nothing else refers to them.
            self._job = fn = None
            self._done.release()

    def start(self, fn, start, stop):
        self._job = (fn, start, stop)
        self._go.release()

    def wait(self):
        self._done.acquire()
        error, self._error = self._error, None
        return error


class Executor:
    """``run(total, fn)`` calls ``fn(start, stop)`` on disjoint ranges covering ``[0, total)``.

    Use :func:`shared` rather than constructing one: executors are per process and per thread
    count, so models and backends share their threads.

    Args:
        threads: how many threads share the work (the caller is one of them).
    """

    def __init__(self, threads):
        self._set_local = _openblas_local_setter() if threads > 1 else None
        self.threads = threads if self._set_local is not None else 1
        self._blas_single = threading.local()
        self._start_workers()
        _executors.add(self)

    def _start_workers(self):
        self._busy = threading.Lock()
        self._workers = [_Worker(f"numres-{i}", self._set_local)
                         for i in range(1, self.threads)]

    @contextlib.contextmanager
    def single_threaded_blas(self):
        """BLAS on one thread in the calling thread for the duration (it is one of the
        executor's threads meanwhile): set once around a whole pass, :meth:`run` skips the
        two library calls per layer, each of which let a waiting worker take the GIL."""
        if self._set_local is None or getattr(self._blas_single, "on", False):
            yield
            return
        previous = self._set_local(1)
        self._blas_single.on = True
        try:
            yield
        finally:
            self._blas_single.on = False
            self._set_local(previous)

    def share(self, fn):
        """Call ``fn(part, parts)`` on each of the ``parts`` threads, for kernels that claim
        their blocks themselves (:func:`next_block`). When the threads are taken, the calls
        run one after another in the caller, and the first does all the work."""
        parts = self.threads

        def each(i0, i1):
            for part in range(i0, i1):
                fn(part, parts)
        self.run(parts, each)

    def run(self, total, fn, parts=None):
        """Split ``[0, total)`` into ``parts`` (default: threads) ranges and run them at once."""
        parts = min(parts or self.threads, total, self.threads)
        if parts < 2:
            fn(0, total)
            return
        if not self._busy.acquire(blocking=False):
            # The workers are taken (another caller, or a nested run): do it all here.
            with self.single_threaded_blas():
                fn(0, total)
            return
        try:
            bounds = [total * i // parts for i in range(parts + 1)]
            started = []
            try:
                for i in range(1, parts):
                    self._workers[i - 1].start(fn, bounds[i], bounds[i + 1])
                    started.append(self._workers[i - 1])
                with self.single_threaded_blas():
                    fn(bounds[0], bounds[1])
            finally:
                errors = [worker.wait() for worker in started]
            for error in errors:
                if error is not None:
                    raise error
        finally:
            self._busy.release()


_executors = weakref.WeakSet()
_shared = {}
_shared_lock = threading.Lock()


def shared(threads):
    """The process's :class:`Executor` for ``threads`` threads (made on first use)."""
    with _shared_lock:
        executor = _shared.get(threads)
        if executor is None:
            executor = _shared[threads] = Executor(threads)
        return executor


def _restart_after_fork():
    # A forked child has none of the parent's threads (and may have copied a lock mid-run):
    # every executor, including those a model already holds, gets fresh workers there.
    global _shared_lock
    _shared_lock = threading.Lock()
    for executor in list(_executors):
        executor._start_workers()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restart_after_fork)


# -- blocks claimed by the threads themselves (inside compiled kernels) ------------------------
@intrinsic
def _claim(typingctx, counters, slot):
    """Atomically ``counters[slot] += 1``; returns the value before (int64 array)."""
    sig = types.int64(counters, types.intp)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        where = builder.gep(array.data, [args[1]])
        return builder.atomic_rmw("add", where, ir.Constant(ir.IntType(64), 1), "monotonic")
    return sig, codegen


# Claim counters one 64-byte line apart, so threads claiming work do not share a line.
COUNTER_STRIDE = 8


def work_counters(parts):
    """Fresh counters for :func:`next_block`, shared by the ``parts`` threads of one run."""
    return np.zeros(parts * COUNTER_STRIDE, np.int64)


@helper
def next_block(counters, part, parts, blocks):
    """The next of ``blocks`` blocks for thread ``part`` of ``parts``, or -1 when none is
    left: first its own contiguous share, in order (the rows it had in the previous layer,
    still in its cache), then whatever the other threads have not started yet.

    Equal static shares made every layer wait for the slower thread, and two virtual CPUs
    are often not equally fast, for minutes at a time (``benchmarks/results/numba-design.md``).
    """
    for i in range(parts):
        p = (part + i) % parts
        lo, hi = blocks * p // parts, blocks * (p + 1) // parts
        if lo >= hi:
            continue
        b = lo + _claim(counters, p * COUNTER_STRIDE)
        if b < hi:
            return b
    return -1
