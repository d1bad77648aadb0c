"""Run work on several threads, each calling BLAS single-threaded, without spinning.

Why not Numba's ``parallel=True`` plus multi-threaded BLAS: the two take turns layer by
layer, and OpenMP workers spin after each region, taking the cores from the BLAS threads that
run next (ResNet-18 ran 7x slower here). Instead every layer is split once, by output rows or
channels, across this module's threads; each thread gathers its block of input (im2col), runs
its GEMM on one core (OpenBLAS's per-thread setting) and applies the epilogue while the block
is still in cache. Idle workers block on a queue and cost nothing.

Where NumPy's BLAS cannot be limited per thread (not OpenBLAS >= 0.3.27), ``Executor`` runs
everything in the calling thread and lets BLAS use its own threads.
"""

import contextlib
import ctypes
import os
from concurrent.futures import ThreadPoolExecutor


def default_threads():
    """``NUMRES_NUM_THREADS``, else ``OMP_NUM_THREADS``, else the CPUs this process may use."""
    for var in ("NUMRES_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var)
        if value:
            try:
                return max(1, int(value.split(",")[0]))
            except ValueError:
                raise ValueError(f"{var} must be an integer, got {value!r}") from None
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


class Executor:
    """``run(total, fn)`` calls ``fn(start, stop)`` on disjoint ranges covering ``[0, total)``.

    Args:
        threads: how many threads share the work (the caller is one of them).
    """

    def __init__(self, threads):
        self._set_local = _openblas_local_setter() if threads > 1 else None
        self.threads = threads if self._set_local is not None else 1
        self._workers = None
        if self.threads > 1:
            self._workers = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="numres",
                                               initializer=self._set_local, initargs=(1,))

    @property
    def parallel(self):
        return self.threads > 1

    @contextlib.contextmanager
    def _single_threaded_blas(self):
        previous = self._set_local(1)
        try:
            yield
        finally:
            self._set_local(previous)

    def run(self, total, fn, parts=None):
        """Split ``[0, total)`` into ``parts`` (default: threads) ranges and run them at once."""
        parts = min(parts or self.threads, total, self.threads)
        if parts < 2:
            fn(0, total)
            return
        bounds = [total * i // parts for i in range(parts + 1)]
        futures = [self._workers.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, parts)]
        try:
            with self._single_threaded_blas():
                fn(bounds[0], bounds[1])
        finally:
            for future in futures:
                future.result()
