"""Whole forward passes captured into CUDA graphs and replayed.

At small batches a pass is a few hundred short kernels, and launching them one by one from
Python costs more than running them. So the first call per input shape runs the pass on a
stream of its own (allocating every buffer, compiling every kernel, planning every GEMM),
then captures one more run of it into a graph; later calls copy the input into the
graph's input buffer and replay it.

What makes a capture valid, and why each step is where it is:

* Each graph has a buffer pool of its own and keeps every block of it: nothing the graph
  uses can be handed to another pass, and nothing else is pinned (there is no tracking of
  the shared pool to start and stop, however the capture ends).
* Nothing is allocated while capturing: warm-up runs fill the graph's pool (repeated until
  one allocates nothing), the stream's GEMM workspace exists, and the capture runs in
  thread-local mode, so an allocation that slipped through is an error rather than a block
  CuPy's pool would hand out again while the graph still writes to it.
* The capture stream waits for the caller's stream before touching the input (the input and
  the weights were written there).
* The graph's buffers are released only when its entry goes: at most ``max_graphs`` captured
  shapes per model, least recently used first, after their last replay has finished (and
  the blocks CuPy's pool kept for its stream are given back).
* A replay waits for the caller's stream, the caller's stream waits for the replay, and the
  next replay waits until the previous results were copied out: no host synchronisation.
* A failed capture is reported with a ``RuntimeWarning`` naming the shape and the error;
  that shape then runs eagerly.
"""

import threading
import warnings

#: Entries kept per model beyond the captured ones (shapes that could not be captured).
MAX_EAGER_MARKERS = 64


class Captured:
    """One shape's graph and everything it points at."""

    def __init__(self, graph, stream, static_in, static_out, pinned, gemm_workspace):
        self.graph, self.stream = graph, stream
        self.static_in, self.static_out = static_in, static_out
        self.pinned, self.gemm_workspace = pinned, gemm_workspace
        self.lock = threading.Lock()      # one set of static buffers: one replay at a time
        self.released = None              # event: the last replay's results are copied out


class Eager(str):
    """A shape that runs eagerly; the string says why."""


class GraphRunner:
    """Capture and replay for one backend.

    Args:
        backend: the :class:`~numres.backends.cupy.backend.CupyBackend` (its workspace,
            eager pass, GEMM workspaces).
        cupy: the ``cupy`` module.
        max_graphs: captured shapes kept per model (each pins one pass's buffers).
    """

    def __init__(self, backend, cupy, max_graphs=2):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.backend, self._cupy, self.max_graphs = backend, cupy, max_graphs
        self._capture_lock = threading.Lock()   # one capture at a time; replays never wait
        self._cache_lock = threading.Lock()     # dict updates (LRU order, eviction)

    @staticmethod
    def captured(entry):
        """True for a cache entry that is a captured graph."""
        return isinstance(entry, Captured)

    def run(self, cache, key, fn, x):
        """``fn(x)`` for a pass keyed ``key``: replayed, captured first if new, or eager."""
        entry = cache.get(key)
        if entry is None:
            with self._capture_lock:
                entry = cache.get(key)
                if entry is None:
                    entry = self._capture(key, fn, x)
                    self._store(cache, key, entry)
        if isinstance(entry, Captured):
            with self._cache_lock:                    # least recently used goes first
                if key in cache and next(reversed(cache)) != key:
                    cache[key] = cache.pop(key)
            return self._replay(entry, x)
        return self.backend.eager(fn, x)

    def _store(self, cache, key, entry):
        with self._cache_lock:
            cache[key] = entry
            captured = [k for k, v in cache.items() if isinstance(v, Captured)]
            gone = [cache.pop(k) for k in captured[:max(0, len(captured) - self.max_graphs)]]
            markers = [k for k, v in cache.items() if isinstance(v, Eager)]
            for old in markers[:max(0, len(markers) - MAX_EAGER_MARKERS)]:
                cache.pop(old)
        streams = []
        while gone:
            evicted = gone.pop()
            # Its last replay may still run: let it finish before its buffers can be handed
            # out again.
            with evicted.lock:
                evicted.stream.synchronize()
            self.backend.forget_stream(evicted.stream)
            streams.append(evicted.stream)
            del evicted                 # its buffers go back to the pool here
        for stream in streams:
            self._release_blocks(stream)

    def _release_blocks(self, stream):
        """Give back the blocks CuPy's pool keeps for ``stream`` (its pool reuses a block
        only on the stream it was allocated on, and this one runs nothing any more)."""
        self._cupy.get_default_memory_pool().free_all_blocks(stream=stream)

    def _capture(self, key, fn, x):
        cupy, backend = self._cupy, self.backend
        caller = cupy.cuda.get_current_stream()
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream, backend.graph_workspace() as pinned:
            stream.wait_event(caller.record())      # the input and the weights are ready
            static_in = cupy.empty_like(x)
            static_in[...] = x
            settled = self._warm_up(fn, static_in)
            gemm_workspace = backend.gemm_workspace(stream)
            try:
                if not settled:
                    raise RuntimeError("the workspace kept allocating over warm-up passes")
                graph, static_out = self._record(stream, fn, static_in)
            except Exception as exc:  # noqa: BLE001 - any capture failure: eager, said aloud
                error = exc
            else:
                error = None
        if error is not None:
            stream.synchronize()        # the warm-up passes used the buffers about to go
            del pinned, static_in, gemm_workspace
            self.backend.forget_stream(stream)
            self._release_blocks(stream)
            warnings.warn(f"numres: CUDA graph capture failed for pass {key!r} "
                          f"({type(error).__name__}: {error}); it runs eagerly",
                          RuntimeWarning, stacklevel=4)
            return Eager(f"{type(error).__name__}: {error}")
        return Captured(graph, stream, static_in, static_out, pinned, gemm_workspace)

    def _warm_up(self, fn, static_in, passes=4):
        """Run ``fn`` until a pass allocates nothing (at most ``passes`` times): then every
        buffer exists, and a pass from the same pool state takes the same buffers. (One pass
        is not enough: the pool hands out the smallest free buffer that fits, so with all of
        the first pass's buffers free a request may take one the first pass made later for
        another request, which then finds nothing.) Also compiles kernels, plans GEMMs and
        makes the stream's GEMM workspace. Returns whether the pool settled."""
        backend = self.backend
        for _ in range(passes):
            before = backend.workspace_allocations
            warm = fn(static_in)
            del warm                       # its buffers serve the next pass
            if backend.workspace_allocations == before:
                return True
        return False

    def _record(self, stream, fn, static_in):
        cupy = self._cupy
        # Thread-local mode: this thread's unsafe calls (an allocation, a synchronisation) fail
        # the capture; other threads' work is not affected.
        stream.begin_capture(mode=cupy.cuda.runtime.streamCaptureModeThreadLocal)
        try:
            out = fn(static_in)
        except BaseException:
            try:
                stream.end_capture()                 # end it; the first error is the story
            except Exception:  # noqa: BLE001
                pass
            raise
        return stream.end_capture(), out

    def _replay(self, entry, x):
        cupy = self._cupy
        with entry.lock:
            caller = cupy.cuda.get_current_stream()
            entry.stream.wait_event(caller.record())     # x was made on the caller's stream
            if entry.released is not None:               # last results copied out
                entry.stream.wait_event(entry.released)
            with entry.stream:
                entry.static_in[...] = x
                entry.graph.launch(entry.stream)
                done = entry.stream.record()
            caller.wait_event(done)
            result = self.backend.copy_results(entry.static_out)
            entry.released = caller.record()
        return result
