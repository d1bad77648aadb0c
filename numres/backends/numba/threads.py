"""numres's threads: each layer's work shared out once, BLAS single-threaded inside them.

Why not Numba's ``parallel=True`` plus multi-threaded BLAS: the two take turns layer by
layer, and OpenMP workers spin after each region, taking the cores from the BLAS threads
that run next. Instead every layer is handed once to this module's threads
(:meth:`Executor.run` splits a range; :meth:`Executor.share` lets kernels claim their blocks
themselves with :func:`next_block`); each thread gathers its block of input, multiplies on
one core (OpenBLAS's per-thread setting) and applies the epilogue while the block is still in
cache. Idle workers spin for at most ``SPIN_US``, then block on a lock and cost nothing.

Why hand-offs spin first and threads are placed: at batch 1 a layer takes well under a
millisecond, and a pool's futures, queue and condition variables cost several times more per
hand-off than a plain lock (``benchmarks/results/numba-design.md``). Each hand-off, to a worker
and back, is a word in memory that the waiting thread watches for up to ``SPIN_US`` with the
GIL released (:func:`spin_wait`) before it blocks on its lock: a blocked thread's CPU halts,
and on a virtual machine waking it goes through the hypervisor. The GIL itself is such a
lock: a thread that asks for it while the other holds it sleeps. So a worker posts its news
and waits for the next job in one call without the GIL (:func:`finish_and_wait`), and takes
the GIL a moment (``GRACE_US``) after its job is posted, once the caller has gone on into
its own kernel. Around each pass
(:meth:`Executor.placed`) the caller stays on its CPU and the workers keep off it; without
that, after the process idled, Linux put a worker and its caller on one CPU for the whole
pass. A run already in progress (another Python thread calling a model, or a kernel that
splits its own work) makes a second ``run`` execute in its caller's thread, so threads are
never oversubscribed and nothing deadlocks.

Where NumPy's BLAS cannot be limited per thread (not OpenBLAS >= 0.3.27), ``Executor`` runs
everything in the calling thread and lets BLAS use its own threads.
"""

import contextlib
import ctypes
import os
import platform
import sys
import threading
import time
import weakref

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .kernels import helper, kernel


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
    """One thread that runs ``fn(start, stop)`` each time :meth:`start` hands it a range.

    Each hand-off, to the worker and back, is first awaited by spinning with the GIL released
    (:func:`spin_wait`); a thread blocks on its lock only after ``spin_ticks`` of that.
    """

    def __init__(self, name, set_local, spin_ticks, grace_ticks=0, times=None):
        # Seconds the caller waited for workers, and the workers ran jobs (Executor.placed
        # resets both at the start of a pass).
        self._times = [0.0, 0.0] if times is None else times
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._state = handoff_state()
        self._spin = spin_ticks
        self._grace = grace_ticks
        self._job = None        # (number, fn, start, stop)
        self._number = 0
        self._error = None
        self._set_local = set_local
        started = threading.Event()
        self.native_id = None
        threading.Thread(target=self._loop, args=(started,), name=name, daemon=True).start()
        started.wait()

    @property
    def spins(self):
        """Whether hand-offs spin before they block (x86, ``NUMRES_SPIN_US`` > 0)."""
        return self._spin > 0

    def _wait_for_job(self):
        """Spin for the next job; True when it came (else the state says SLEEPING)."""
        return spin_wait(self._state, _GO, self._spin, self._grace, _WORKER_CPU, _CALLER_CPU)

    def _loop(self, started):
        self.native_id = threading.get_native_id()
        started.set()
        self._set_local(1)
        state, last = self._state, 0
        news = self._wait_for_job()
        while True:
            if not news:
                self._go.acquire()
            state[_GO] = _WAITING
            job = self._job
            # None or a job already run: a wake-up (Executor.placed), or a post that arrived
            # after this thread had already taken its job.
            if job is None or job[0] == last:
                news = self._wait_for_job()
                continue
            last, fn, start, stop = job
            began = time.perf_counter()
            try:
                fn(start, stop)
            except BaseException as exc:  # noqa: BLE001  (re-raised in the caller)
                self._error = exc
            self._times[1] += time.perf_counter() - began
            # Drop the job now: it holds the layer's buffers, which the workspace may only
            # reuse once nothing else refers to them.
            job = fn = None
            state[_FINISHED] = last
            # The news, and the wait for the next job, in one call without the GIL: posted
            # from Python, the caller would wake while this thread still held the GIL, and
            # block for it (see GRACE_US).
            found = finish_and_wait(state, self._spin, self._grace)
            if found == _CALLER_SLEEPS:
                _release(self._done)
                news = self._wait_for_job()
            else:
                news = found == _NEXT_JOB

    def start(self, fn, start, stop):
        self._number += 1
        self._job = (self._number, fn, start, stop)
        self.wake()

    def wake(self):
        """Have the worker spin (if it was blocked), ready for work that comes soon."""
        if post(self._state, _GO, _CALLER_CPU) == _SLEEPING:
            _release(self._go)

    def wait(self):
        """Wait until the worker has finished the last job :meth:`start` gave it; returns
        the exception it raised, or None.

        The worker notes the number of each job it finishes, and this waits for that
        number, not for any news: a wait interrupted before (KeyboardInterrupt) may have
        left a post, or a released lock, behind.
        """
        state = self._state
        # Checked first, so that a wait interrupted after the news came returns at once
        # when called again.
        while state[_FINISHED] != self._number:
            if not spin_wait(state, _DONE, self._spin, 0, _CALLER_CPU, _WORKER_CPU):
                self._done.acquire()
            state[_DONE] = _WAITING
        self._job = None
        error, self._error = self._error, None
        return error


def _wait_all(workers):
    """Every worker's :meth:`_Worker.wait`, finished even when interrupted (they are still
    writing into the layer's buffers); the first interruption is re-raised afterwards."""
    errors, interrupted = [], None
    for worker in workers:
        while True:
            try:
                errors.append(worker.wait())
                break
            except BaseException as exc:  # noqa: BLE001  (re-raised below)
                interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
    return errors


def _release(lock):
    """Release a hand-off lock that may already be released: a waiter interrupted after it
    said it would block never took it (it counts as one credit, and waiters check the job
    number, so a second release has nothing to add)."""
    try:
        lock.release()
    except RuntimeError:
        pass


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
        ticks = spin_ticks() if self.threads > 1 else 0
        grace = spin_ticks(GRACE_US) if ticks else 0
        # Seconds in this pass the caller waited for workers and the workers ran jobs, and
        # runs shared out (:meth:`_note_contention`).
        self._times, self._runs = [0.0, 0.0], 0
        self._solo = False          # this pass runs in the caller alone
        self._solo_until = 0.0      # time.monotonic() until which passes run alone
        self._backoff = SOLO_S[0]
        self._suspect = False       # the last pass looked contended
        self._workers = [_Worker(f"numres-{i}", self._set_local, ticks, grace, self._times)
                         for i in range(1, self.threads)]
        self._kept_off = None     # (caller's CPU, CPUs) the workers were last placed by
        self._owner = None
        self._owner_lock = threading.Lock()
        self._place = _LINUX and os.environ.get("NUMRES_PLACE_THREADS", "1") != "0"

    @contextlib.contextmanager
    def placed(self):
        """Around a pass: the calling thread stays on the CPU it is on, the workers keep off
        that CPU and are woken to spin, ready for the first layer (a worker woken from a
        block by the layer itself arrives late for it after the process has idled).

        Why placement: after the process has idled, Linux wakes a worker on the caller's
        CPU (and later the caller on the worker's), and the two then take turns on one CPU,
        each too recently run ("cache hot") for the load balancer to move: a 0.25 s pause
        made ResNet-50 at batch 1 1.8x slower on 2 CPUs
        (``benchmarks/results/numba-design.md``). Only the first of concurrent passes is
        placed; ``NUMRES_PLACE_THREADS=0`` leaves placement to the scheduler. While other
        processes take our CPUs (:attr:`contended`), passes run in the caller alone, not
        placed.
        """
        me = threading.get_ident()
        with self._owner_lock:
            mine = bool(self._workers) and self._owner is None
            if mine:
                self._owner = me
        if not mine:
            yield
            return
        if time.monotonic() < self._solo_until:
            # Contended: the caller alone, wherever the scheduler finds room for it.
            self._solo = True
            try:
                yield
            finally:
                self._solo = False
                self._owner = None
            return
        runs, start = self._runs, time.perf_counter()
        self._times[:] = [0.0, 0.0]
        previous = None
        try:
            try:
                cpu = current_cpu() if self._place else -1
                if cpu >= 0:
                    cpus = os.sched_getaffinity(0)
                    self._keep_off(cpu, cpus)
                    previous = cpus
                    os.sched_setaffinity(0, {cpu})
            except OSError:           # a container that forbids it: the scheduler decides
                self._place = False
            if self._busy.acquire(blocking=False):
                try:
                    for worker in self._workers:
                        worker.wake()
                finally:
                    self._busy.release()
            yield
            wall = time.perf_counter() - start
            waited, worked = self._times
            idle = waited + len(self._workers) * wall - worked
            self._note_contention(idle, wall, self._runs - runs)
        finally:
            if previous is not None:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, previous)
            self._owner = None

    def _note_contention(self, idle, wall, runs):
        """After a pass of ``wall`` seconds and ``runs`` shared runs, in which the threads
        were ``idle`` seconds in all (the caller waiting for workers, workers between jobs).

        Where other processes keep our CPUs busy, threads wait for each other at every
        hand-off while the one they wait for is off its CPU. ResNet-50 at batch 1 on 2 CPUs
        (``benchmarks/contended.py``): idle machine 0.15-0.2 s idle per second of the pass;
        one process busy on one CPU 0.75-1.0 (two threads 40-43 ms, one 36 ms); one busy
        process on each CPU ~1.0 (63 ms, one thread 68 ms); two on each 1.7 (192 ms, one
        thread 117 ms). Two passes in a row idle :data:`CONTENDED_IDLE` s per second (one,
        while passes that try both threads again still find the CPUs taken) make passes run
        in the caller alone for ``SOLO_S[0]`` s, doubling up to ``SOLO_S[1]`` s while it
        lasts.
        """
        if runs < CONTENDED_RUNS or not self._workers[0].spins:
            return      # too short to judge, or every wait blocks (no spinning)
        if idle < CONTENDED_IDLE * wall:
            self._suspect, self._backoff = False, SOLO_S[0]
        elif self._suspect or self._backoff > SOLO_S[0]:
            self._solo_until = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, SOLO_S[1])
        else:
            self._suspect = True        # one slow pass may be a hiccup of the machine

    @property
    def contended(self):
        """Whether passes now run in the caller alone (:meth:`_note_contention`)."""
        return time.monotonic() < self._solo_until

    def _keep_off(self, cpu, cpus):
        """Let the workers run on any of ``cpus`` but ``cpu`` (system calls only when these
        are not what they were set to last time)."""
        key = (cpu, frozenset(cpus))
        if key == self._kept_off:
            return
        allowed = set(cpus) - {cpu}
        if len(allowed) >= len(self._workers):
            for worker in self._workers:
                os.sched_setaffinity(worker.native_id, allowed)
        self._kept_off = key

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
        if self._solo:
            with self.single_threaded_blas():
                fn(0, total)
            return
        self._runs += 1
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
                waiting = time.perf_counter()
                errors = _wait_all(started)
                self._times[0] += time.perf_counter() - waiting
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


# Claim counters one 64-byte line apart, so threads claiming work do not share a line.
COUNTER_STRIDE = 8


def _element(context, builder, signature, args):
    """The address of ``array[slot]`` for an intrinsic whose first two arguments are an
    int64 array and an index."""
    array = context.make_array(signature.args[0])(context, builder, args[0])
    return builder.gep(array.data, [args[1]])


# -- waiting by spinning -------------------------------------------------------------------
# A hand-off word's states: the waiter spins while WAITING, has gone to block on a lock once
# SLEEPING (so the poster must release it), and POSTED is the news it waits for.
_WAITING, _SLEEPING, _POSTED = 0, 1, 2
# Words of a worker's state: the hand-off to it, the hand-off back, where each of the two
# threads (the caller, the worker) last ran, and the number of the last job the worker
# finished; each on its own cache line.
_GO, _DONE, _CALLER_CPU, _WORKER_CPU, _FINISHED = (
    i * COUNTER_STRIDE for i in range(5))
#: How long (microseconds) a thread spins for the next hand-off before it blocks.
SPIN_US = 1000
#: How long (microseconds) a worker goes on spinning once its job is posted, before it takes
#: the GIL to start it: the caller posts from Python and holds the GIL for a few more
#: microseconds until its own kernel releases it; a worker that asked for the GIL meanwhile
#: would block, its CPU halt, and on a virtual machine waking it took 30-45 us, the worker
#: starting each layer that late.
GRACE_US = 10
#: A pass of at least this many shared runs is judged for contention
#: (:meth:`Executor._note_contention`): contended where its threads were idle (waiting for
#: each other) this many seconds per second of the pass.
CONTENDED_RUNS = 8
CONTENDED_IDLE = 1.2
#: Seconds contended passes run in the caller alone: the first time, and at most.
SOLO_S = (0.5, 16.0)


@intrinsic
def _exchange(typingctx, state, slot, value):
    """Atomically ``state[slot] = value``; returns the value before (int64 array)."""
    sig = types.int64(state, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        where = _element(context, builder, signature, args)
        return builder.atomic_rmw("xchg", where, args[2], "seq_cst")
    return sig, codegen


@intrinsic
def _compare_exchange(typingctx, state, slot, expected, value):
    """Atomically ``state[slot] = value`` if it is ``expected``; returns the value before."""
    sig = types.int64(state, types.intp, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        where = _element(context, builder, signature, args)
        pair = builder.cmpxchg(where, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)
    return sig, codegen


@intrinsic
def _load(typingctx, state, slot):
    """``state[slot]``, read from memory each time (a plain load could be hoisted out of a
    loop that waits for another thread to change it)."""
    sig = types.int64(state, types.intp)

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_element(context, builder, signature, args), "acquire", 8)
    return sig, codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_LINUX = sys.platform.startswith("linux")


def _libc_call(name):
    """An intrinsic calling the C library's ``int name(void)`` (found by name when the
    code is linked) on Linux; elsewhere it returns -1 without calling anything."""
    @intrinsic
    def call(typingctx):
        sig = types.int64()

        def codegen(context, builder, signature, args):
            if not _LINUX:
                return ir.Constant(ir.IntType(64), -1)
            module = builder.module
            fn = module.globals.get(name) or ir.Function(
                module, ir.FunctionType(ir.IntType(32), []), name)
            return builder.sext(builder.call(fn, []), ir.IntType(64))
        return sig, codegen
    return call


# A spinning thread stops when the thread it waits for is on its CPU (the other can only
# progress if it blocks, and waking a blocked thread lets the scheduler move it to an idle
# CPU). It does not yield between checks: with another process busy on its CPU, each
# sched_yield handed that process the CPU for a whole time slice, so the worker was off
# its CPU at nearly every hand-off (ResNet-50 at batch 1 on 2 CPUs, one CPU busy: 228 ms a
# pass, 40-43 ms without the yield, 36 ms on one thread; on an idle machine, interleaved
# against the yielding spin: 1.02-1.06x back to back, 1.00-1.09x after 0.25 s and 2 s).
_cpu = _libc_call("sched_getcpu")


@intrinsic
def _ticks(typingctx):
    """x86's time-stamp counter after a ``pause`` (which tells the core, and a hypervisor,
    that this is a spin loop); 0 elsewhere, where numres does not spin."""
    sig = types.int64()

    def codegen(context, builder, signature, args):
        if not _X86:
            return ir.Constant(ir.IntType(64), 0)
        module = builder.module
        for name, ret in (("llvm.x86.sse2.pause", ir.VoidType()),
                          ("llvm.readcyclecounter", ir.IntType(64))):
            if name not in module.globals:
                ir.Function(module, ir.FunctionType(ret, []), name)
        builder.call(module.globals["llvm.x86.sse2.pause"], [])
        return builder.call(module.globals["llvm.readcyclecounter"], [])
    return sig, codegen


def handoff_state():
    """The words two threads hand work over with (``_GO``, ``_DONE``), where each last
    ran (``_CALLER_CPU``, ``_WORKER_CPU``; -1: not yet known) and the number of the last job
    the worker finished (``_FINISHED``)."""
    state = np.zeros(5 * COUNTER_STRIDE, np.int64)
    state[_CALLER_CPU] = state[_WORKER_CPU] = -1
    return state


@kernel
def post(state, slot, mine):
    """Post news to the thread that waits on ``state[slot]``, noting this thread's CPU in
    ``state[mine]``; returns the state before (``_SLEEPING``: the poster must release the
    waiter's lock)."""
    state[mine] = _cpu()
    return _exchange(state, slot, _POSTED)


@kernel
def spin_wait(state, slot, ticks, grace, mine, theirs):
    """Wait up to ``ticks`` time-stamp-counter ticks for news on ``state[slot]``, spinning
    (called from Python, the GIL is released meanwhile), unless the other thread (its CPU in
    ``state[theirs]``; this one's is noted in ``state[mine]``) is on this thread's CPU; news
    that came while spinning is returned ``grace`` ticks later (:data:`GRACE_US`).
    Returns True when the news came; False once the state says SLEEPING, and the caller must
    block on its lock."""
    if ticks > 0 and _X86:        # elsewhere the counter reads 0: never spin
        end = _ticks() + ticks
        while _ticks() < end:
            if _load(state, slot) == _POSTED:
                seen = _ticks()
                while _ticks() - seen < grace:
                    pass
                return True
            here = _cpu()
            state[mine] = here
            if here >= 0 and here == _load(state, theirs):
                break
    return _compare_exchange(state, slot, _WAITING, _SLEEPING) == _POSTED


# What :func:`finish_and_wait` found.
_BLOCK, _NEXT_JOB, _CALLER_SLEEPS = 0, 1, 2


@kernel
def finish_and_wait(state, ticks, grace):
    """A worker's news that its job is done, then its wait for the next (``spin_wait``),
    in one call without the GIL. Returns ``_CALLER_SLEEPS`` when the caller had blocked on
    its lock (release it, then wait as usual), ``_NEXT_JOB`` when the next job came while
    spinning, else ``_BLOCK`` (block on the lock; the state says SLEEPING)."""
    if post(state, _DONE, _WORKER_CPU) == _SLEEPING:
        return _CALLER_SLEEPS
    if spin_wait(state, _GO, ticks, grace, _WORKER_CPU, _CALLER_CPU):
        return _NEXT_JOB
    return _BLOCK


@kernel
def current_cpu():
    """The CPU the calling thread runs on (Linux), else -1."""
    return _cpu()


@kernel
def _now():
    return _ticks()


def compile_handoffs():
    """Compile (or load from cache) this module's hand-off kernels (``warmup``)."""
    state = handoff_state()
    post(state, _GO, _CALLER_CPU)
    spin_wait(state, _GO, 0, 0, _WORKER_CPU, _CALLER_CPU)
    finish_and_wait(handoff_state(), 0, 0)
    current_cpu()
    _now()


_spin_rate = []


def spin_ticks(us=None):
    """How many time-stamp-counter ticks a thread spins before it blocks: ``NUMRES_SPIN_US``
    microseconds (default :data:`SPIN_US`), or ``us``; the counter's rate is measured against
    the clock once per process. 0 where the CPU is not x86."""
    if us is None:
        us = os.environ.get("NUMRES_SPIN_US", SPIN_US)
    seconds = float(us) * 1e-6
    if not _X86 or seconds <= 0:
        return 0
    if not _spin_rate:
        _now()
        t0, c0 = time.perf_counter(), _now()
        while time.perf_counter() - t0 < 0.002:
            pass
        _spin_rate.append((_now() - c0) / (time.perf_counter() - t0))
    return int(seconds * _spin_rate[0])


# -- blocks claimed by the threads themselves (inside compiled kernels) ------------------------
@intrinsic
def _claim(typingctx, counters, slot):
    """Atomically ``counters[slot] += 1``; returns the value before (int64 array)."""
    sig = types.int64(counters, types.intp)

    def codegen(context, builder, signature, args):
        where = _element(context, builder, signature, args)
        return builder.atomic_rmw("add", where, ir.Constant(ir.IntType(64), 1), "monotonic")
    return sig, codegen


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
