"""The emulated GPU: device memory, streams, events, graph capture, and the ordering checks.

Work is done on the host, at the moment it is enqueued (in program order, one operation at a
time under one lock), so results are those of *some* legal GPU execution. What makes the
emulation worth having is what it refuses: every enqueued operation names the device memory
it reads and writes, and a vector clock per stream (merged by events, host synchronisation
and the legacy stream's implicit barriers) tells whether the operation is ordered after the
last conflicting one on another stream. An unordered read-after-write, write-after-write or
write-after-read is a race on a real GPU, whatever the emulator happened to compute; it is
recorded as a violation and raised.
"""

import bisect
import collections
import itertools
import threading

import numpy as np

#: Bytes of freed device memory kept (unusable) before it is really released, so that a
#: pointer into freed memory is recognised as such rather than as some later allocation.
QUARANTINE_BYTES = 512 << 20
ALIGNMENT = 512            # CuPy's memory pool rounds every block to 512 bytes


class StandinError(RuntimeError):
    """A rule of CUDA or CuPy was broken. Each is also appended to ``Device.violations``, so
    code that swallows exceptions cannot hide it from the test."""


class CUDARuntimeError(RuntimeError):
    """What ``cupy_backends.cuda.api.runtime.CUDARuntimeError`` reports: a failed CUDA call."""


class OutOfMemoryError(MemoryError):
    """What ``cupy.cuda.memory.OutOfMemoryError`` reports."""


class Block:
    """A block of device memory (a 512-byte aligned host buffer) and its access history.
    The device's registry holds blocks; arrays hold the :class:`Allocation` that owns one."""

    def __init__(self, nbytes):
        raw = np.empty(max(int(nbytes), 1) + ALIGNMENT, np.uint8)
        start = -raw.ctypes.data % ALIGNMENT
        self.buf = raw[start:start + max(int(nbytes), 1)]
        self.ptr = self.buf.ctypes.data
        self.size = int(nbytes)
        self.alive = True
        self.last_write = None          # (stream key, sequence number)
        self.reads = {}                 # stream key -> sequence number of its last read


class Allocation:
    """Ownership of one block: when the last array using it goes, the block is freed."""

    def __init__(self, device, block):
        self._device, self.block = device, block

    ptr = property(lambda self: self.block.ptr)
    buf = property(lambda self: self.block.buf)
    size = property(lambda self: self.block.size)

    def __del__(self):
        self._device.release(self.block)


class Capture:
    """A stream capture in progress: the nodes recorded so far, or why it is invalid."""

    def __init__(self, stream, mode, thread):
        self.stream, self.mode, self.thread = stream, mode, thread
        self.nodes = []
        self.invalid = None


class Node:
    """One recorded operation: ``run()`` does it; ``accesses`` are (pointer, "r"/"w")."""

    def __init__(self, label, run, accesses):
        self.label, self.run, self.accesses = label, run, tuple(accesses)


class StreamState:
    """A CUDA stream: legacy (the null stream), blocking or non-blocking."""

    def __init__(self, key, legacy=False, blocking=True):
        self.key, self.legacy, self.blocking = key, legacy, blocking
        self.clock = {}
        self.capture = None


class Device:
    """The emulated device and its bookkeeping; one per installed stand-in.

    Args:
        total_bytes: the device's memory, for ``mem_info`` and out-of-memory errors.
    """

    MODES = {0: "global", 1: "thread-local", 2: "relaxed"}

    def __init__(self, total_bytes=16 << 30):
        self.lock = threading.RLock()
        self.total_bytes = total_bytes
        self.used_bytes = 0
        self.peak_bytes = 0
        self.pool_bytes = 0     # what CuPy's caching pool would hold: its high-water mark
        self.violations = []
        self.allocations = {}           # start address -> Block
        self._starts = []
        self._quarantine = collections.deque()
        self._quarantined = 0
        self._keys = itertools.count(0x7000, 0x10)
        self.streams = {}
        self.null = self.new_stream(legacy=True)
        self.host_clock = {}
        self.graph_launches = 0
        self.allocation_log = None      # a list to append (nbytes, label) to, when set

    # -- violations ------------------------------------------------------------------------
    def violation(self, message, exc=StandinError):
        """Record ``message`` and return the exception to raise."""
        with self.lock:
            self.violations.append(f"[{threading.current_thread().name}] {message}")
        return exc(message)

    # -- memory ----------------------------------------------------------------------------
    def allocate(self, nbytes, label="array"):
        """A new block, as CuPy's pool hands one out on the current stream.

        Raises:
            StandinError: the calling thread is capturing a CUDA graph. (CuPy allows it, and
                the block goes back to the pool when its array dies while the graph still
                uses its address: stricter here on purpose.)
            OutOfMemoryError: more than the device's memory.
        """
        with self.lock:
            capture = self.capturing_here()
            if capture is not None:
                capture.invalid = capture.invalid or "allocation during capture"
                raise self.violation(
                    f"allocation of {nbytes} bytes ({label}) during stream capture: the block "
                    "would return to the pool while the graph still uses its address")
            if self.used_bytes + nbytes > self.total_bytes:
                raise OutOfMemoryError(f"out of memory allocating {nbytes:,} bytes "
                                       f"(allocated so far: {self.used_bytes:,} bytes)")
            block = Block(nbytes)
            self.allocations[block.ptr] = block
            bisect.insort(self._starts, block.ptr)
            self.used_bytes += block.size
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)
            self.pool_bytes = max(self.pool_bytes, self.used_bytes)
            if self.allocation_log is not None:
                self.allocation_log.append((block.size, label))
            return Allocation(self, block)

    def release(self, block):
        with self.lock:
            if not block.alive:
                return
            block.alive = False
            self.used_bytes -= block.size
            self._quarantine.append(block)
            self._quarantined += block.size
            while self._quarantined > QUARANTINE_BYTES:
                old = self._quarantine.popleft()
                self._quarantined -= old.size
                self.allocations.pop(old.ptr, None)
                i = bisect.bisect_left(self._starts, old.ptr)
                if i < len(self._starts) and self._starts[i] == old.ptr:
                    del self._starts[i]

    def find(self, ptr):
        """The block holding address ``ptr`` (alive or in quarantine), or None."""
        with self.lock:
            i = bisect.bisect_right(self._starts, ptr) - 1
            if i >= 0:
                alloc = self.allocations[self._starts[i]]
                if ptr < alloc.ptr + max(alloc.size, 1):
                    return alloc
            return None

    def check_pointer(self, ptr, nbytes, what):
        """The live block holding ``[ptr, ptr + nbytes)``.

        Raises:
            StandinError: not device memory, freed, or running past the block's end.
        """
        alloc = self.find(ptr)
        if alloc is None:
            raise self.violation(f"{what}: 0x{ptr:x} is not device memory")
        if not alloc.alive:
            raise self.violation(f"{what}: 0x{ptr:x} points into freed device memory")
        if ptr + nbytes > alloc.ptr + alloc.size:
            raise self.violation(f"{what}: {nbytes} bytes at 0x{ptr:x} run past the end of "
                                 f"its {alloc.size}-byte block")
        return alloc

    # -- streams ---------------------------------------------------------------------------
    def new_stream(self, legacy=False, blocking=True):
        with self.lock:
            key = 0 if legacy else next(self._keys)
            state = StreamState(key, legacy=legacy, blocking=blocking)
            self.streams[key] = state
            return state

    def stream(self, key):
        with self.lock:
            state = self.streams.get(int(key))
        if state is None:
            raise self.violation(f"0x{int(key):x} is not a stream")
        return state

    def capturing_here(self):
        """The capture the calling thread has in progress, if any."""
        me = threading.get_ident()
        for state in self.streams.values():
            if state.capture is not None and state.capture.thread == me:
                return state.capture
        return None

    def _advance(self, stream):
        clock = stream.clock
        _merge(clock, self.host_clock)
        if stream.legacy:            # the legacy stream waits for every blocking stream
            for other in self.streams.values():
                if other.blocking and other is not stream:
                    _merge(clock, other.clock)
        elif stream.blocking:        # and blocking streams wait for the legacy stream
            _merge(clock, self.null.clock)
        clock[stream.key] = clock.get(stream.key, 0) + 1
        return clock[stream.key]

    def enqueue(self, stream, label, run, accesses):
        """Do (or, on a capturing stream, record) ``run`` as an operation of ``stream`` that
        reads and writes ``accesses``: (pointer, "r" or "w") pairs, one per buffer touched.

        Raises:
            StandinError: a race, freed memory, an illegal call during a capture.
        """
        with self.lock:
            capture = stream.capture
            if capture is not None:
                if capture.invalid:       # a consequence, not a new violation
                    raise CUDARuntimeError(f"{label}: cudaErrorStreamCaptureInvalidated (the "
                                           f"capture on this stream was invalidated: "
                                           f"{capture.invalid})")
                capture.nodes.append(Node(label, run, accesses))
                return
            mine = self.capturing_here()
            if stream.legacy and mine is not None and mine.mode in (0, 1):
                mine.invalid = mine.invalid or "legacy stream used"
                raise self.violation(f"{label} on the legacy stream while this thread "
                                     "captures (cudaErrorStreamCaptureImplicit)")
            self._run(stream, [Node(label, run, accesses)])

    def _run(self, stream, nodes):
        blocks = {}                     # block start -> [Block, written?]
        for node in nodes:
            for ptr, mode in node.accesses:
                alloc = self.check_pointer(ptr, 0, node.label)
                entry = blocks.setdefault(alloc.ptr, [alloc, False])
                entry[1] = entry[1] or mode == "w"
        seq = self._advance(stream)
        clock = stream.clock
        for alloc, written in blocks.values():
            last = alloc.last_write
            if last is not None and last[0] != stream.key and clock.get(last[0], 0) < last[1]:
                raise self.violation(f"{nodes[0].label}: races with an unordered write to "
                                     f"0x{alloc.ptr:x} on stream 0x{last[0]:x}")
            if written:
                for key, when in alloc.reads.items():
                    if key != stream.key and clock.get(key, 0) < when:
                        raise self.violation(f"{nodes[0].label}: overwrites 0x{alloc.ptr:x} "
                                             f"while stream 0x{key:x} may still read it")
        for node in nodes:
            node.run()
        for alloc, written in blocks.values():
            if written:
                alloc.last_write, alloc.reads = (stream.key, seq), {}
            else:
                alloc.reads[stream.key] = seq

    def record(self, stream):
        """The clock an event recorded on ``stream`` now carries."""
        with self.lock:
            if stream.capture is not None:
                raise NotImplementedError("the stand-in does not emulate events recorded "
                                          "during a capture")
            clock = dict(stream.clock)
            _merge(clock, self.host_clock)
            if stream.legacy:        # a record on the legacy stream waits like any of its work
                for other in self.streams.values():
                    if other.blocking and other is not stream:
                        _merge(clock, other.clock)
            return clock

    def wait(self, stream, clock):
        """``stream`` waits for an event carrying ``clock`` (None: never recorded)."""
        with self.lock:
            if stream.capture is not None:
                stream.capture.invalid = stream.capture.invalid or "waited on an outside event"
                raise self.violation("a capturing stream waits on an event recorded outside "
                                     "the capture (cudaErrorStreamCaptureIsolation)",
                                     CUDARuntimeError)
            if clock:
                _merge(stream.clock, clock)

    def host_sync(self, stream=None, clock=None, what="synchronize"):
        """The host waits for ``stream``, or for an event carrying ``clock``, or (neither)
        for the whole device.

        Raises:
            CUDARuntimeError: the wait covers a capturing stream, or the calling thread
                captures in global or thread-local mode (a host synchronisation is
                "potentially unsafe" there): the capture is invalidated, as CUDA does.
        """
        with self.lock:
            if clock is not None:
                targets = []
            elif stream is not None:
                targets = [stream]
            else:
                targets = list(self.streams.values())
            bad = [s.capture for s in targets if s.capture is not None]
            mine = self.capturing_here()
            if mine is not None and mine.mode in (0, 1) and mine not in bad:
                bad.append(mine)
            if bad:
                for capture in bad:
                    capture.invalid = capture.invalid or f"{what} during capture"
                raise self.violation(f"{what} during stream capture "
                                     "(cudaErrorStreamCaptureUnsupported)", CUDARuntimeError)
            if clock is not None:
                _merge(self.host_clock, clock)
            for state in targets:
                _merge(self.host_clock, state.clock)

    # -- capture ---------------------------------------------------------------------------
    def begin_capture(self, stream, mode):
        with self.lock:
            if stream.legacy:
                raise RuntimeError("cannot capture on the default (legacy) stream")
            if stream.capture is not None:
                raise CUDARuntimeError("cudaErrorIllegalState: the stream is already capturing")
            if mode not in self.MODES:
                raise CUDARuntimeError(f"cudaErrorInvalidValue: capture mode {mode}")
            stream.capture = Capture(stream, mode, threading.get_ident())

    def end_capture(self, stream):
        """The captured nodes.

        Raises:
            CUDARuntimeError: not capturing, or the capture was invalidated (it ends anyway).
        """
        with self.lock:
            capture = stream.capture
            if capture is None:
                raise CUDARuntimeError("cudaErrorIllegalState: the stream is not capturing")
            stream.capture = None
            if capture.thread != threading.get_ident() and capture.mode != 2:
                raise self.violation("cudaStreamEndCapture from another thread",
                                     CUDARuntimeError)
            if capture.invalid:
                raise CUDARuntimeError("cudaErrorStreamCaptureInvalidated: operation not "
                                       f"permitted when stream is capturing ({capture.invalid})")
            return capture.nodes

    def launch_graph(self, stream, nodes):
        """Replay captured ``nodes`` on ``stream``, checking every buffer they touch."""
        with self.lock:
            if stream.capture is not None:
                raise NotImplementedError("the stand-in does not emulate graph launches "
                                          "inside a capture")
            self.graph_launches += 1
            self._run(stream, list(nodes))


def _merge(into, other):
    for key, value in other.items():
        if into.get(key, 0) < value:
            into[key] = value
