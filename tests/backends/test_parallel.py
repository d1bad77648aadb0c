"""numres's thread pool and per-thread scratch (``backends/numba/threads.py``,
``backends/_workspace.py``)."""

import multiprocessing
import os
import sys
import threading
import time

import numpy as np
import pytest

from numres.backends import _workspace

pool = pytest.importorskip("numres.backends.numba.threads", reason="Numba is not installed")


def _two_threads():
    executor = pool.Executor(2)
    if executor.threads < 2:
        pytest.skip("NumPy's BLAS is not OpenBLAS >= 0.3.27 (no per-thread limit): "
                    "numres runs single-threaded there")
    return executor


def test_run_covers_the_range_once_on_distinct_threads():
    executor = _two_threads()
    seen, names = np.zeros(1001, np.int64), set()

    def fn(start, stop):
        seen[start:stop] += 1
        names.add(threading.current_thread().name)
    executor.run(1001, fn)
    assert (seen == 1).all()
    assert len(names) == 2


def test_a_worker_error_reaches_the_caller_and_the_pool_still_works():
    executor = _two_threads()

    def fn(start, stop):
        if start > 0:
            raise KeyError("from the worker")
    with pytest.raises(KeyError, match="from the worker"):
        executor.run(10, fn)
    out = np.zeros(10)
    executor.run(10, lambda a, b: out.__setitem__(slice(a, b), 1))
    assert out.sum() == 10


def test_nested_and_concurrent_runs_fall_back_to_the_caller():
    executor = _two_threads()
    total = np.zeros(64, np.int64)

    def inner(start, stop):
        total[start:stop] += 1

    def outer(start, stop):
        # Runs while the pool is busy: must not wait for a worker that is running us.
        executor.run(64, inner)
    executor.run(2, outer)
    assert (total == 2).all()

    results = []

    def caller():
        acc = np.zeros(500, np.int64)
        for _ in range(200):
            executor.run(500, lambda a, b: acc.__setitem__(slice(a, b), acc[a:b] + 1))
        results.append(acc)
    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3 and all((r == 200).all() for r in results)


def _child_runs(executor, queue):
    out = np.zeros(100)
    executor.run(100, lambda a, b: out.__setitem__(slice(a, b), 1))
    queue.put(float(out.sum()))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="this platform cannot fork")
def test_a_forked_child_gets_working_threads():
    """An executor the parent already used (as a model's backend holds it) works in a child."""
    executor = _two_threads()
    executor.run(10, lambda a, b: None)      # the parent's workers exist
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_runs, args=(executor, queue))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == 100.0


def test_shared_executor_is_one_per_thread_count():
    assert pool.shared(2) is pool.shared(2)
    assert pool.shared(1).threads == 1


def test_thread_scratch_is_private_and_grows():
    a = _workspace.thread_scratch("test", (3, 5))
    assert a.shape == (3, 5) and a.ctypes.data % 64 == 0
    b = _workspace.thread_scratch("test", (10, 10))
    assert b.shape == (10, 10)
    other = []
    t = threading.Thread(target=lambda: other.append(_workspace.thread_scratch("test", (3, 5))))
    t.start()
    t.join()
    assert not np.shares_memory(other[0], _workspace.thread_scratch("test", (3, 5)))


def test_buffers_are_free_after_a_call(rng):
    """Nothing keeps a layer's buffers alive after the call (a worker holding its last job
    did, and the next layers then allocated new ones: ResNet-50 batch 32 peak +170 MB)."""
    import numres
    from numres.backends.numba import NumbaBackend
    # Not a recorded pass: a plan keeps its buffers by design (tests/backends/test_replay.py).
    model = numres.resnet18(num_classes=4, backend=NumbaBackend(threads=2, replay=False))
    model(rng.standard_normal((1, 3, 64, 64)).astype(np.float32))
    local = model.backend.workspace._local
    assert local.buffers
    busy = [i for i in range(len(local.buffers))
            if sys.getrefcount(local.buffers[i]) != _workspace._FREE]
    assert busy == []


@pytest.mark.parametrize("parts,blocks", [(1, 5), (2, 0), (2, 1), (2, 7), (3, 8)])
def test_claimed_blocks_are_handed_out_once_own_share_first(parts, blocks):
    counters = pool.work_counters(parts)
    taken = {p: [] for p in range(parts)}
    active = list(range(parts))
    while active:                        # the threads claim in turn until none is left
        for p in list(active):
            b = pool.next_block(counters, p, parts, blocks)
            if b < 0:
                active.remove(p)
            else:
                taken[p].append(b)
    assert sorted(b for bs in taken.values() for b in bs) == list(range(blocks))
    for p in range(parts):
        # Each works through its own share from the start, in order, before taking others'
        # (which a thread that finished early may have entered).
        share = list(range(blocks * p // parts, blocks * (p + 1) // parts))
        own = [b for b in taken[p] if b in share]
        assert own == taken[p][:len(own)] == share[:len(own)]


def test_a_lone_thread_takes_over_the_other_shares():
    counters = pool.work_counters(2)
    assert pool.next_block(counters, 1, 2, 6) == 3      # the other thread started
    got = []
    while (b := pool.next_block(counters, 0, 2, 6)) >= 0:
        got.append(b)
    assert got == [0, 1, 2, 4, 5]


# -- hand-offs by spinning, and where the threads run --------------------------------------
def _state():
    return pool.handoff_state()


def test_news_posted_before_the_wait_is_seen_without_blocking():
    state = _state()
    assert pool.post(state, pool._GO, pool._CALLER_CPU) == pool._WAITING
    assert pool.spin_wait(state, pool._GO, 0, 0, pool._WORKER_CPU, pool._CALLER_CPU)


def test_a_wait_that_times_out_says_block_and_the_poster_must_release():
    state = _state()
    ticks = pool.spin_ticks() // 100 or 1000       # ~10 us: no news comes
    assert not pool.spin_wait(state, pool._GO, ticks, 0, pool._WORKER_CPU, pool._CALLER_CPU)
    assert state[pool._GO] == pool._SLEEPING
    assert pool.post(state, pool._GO, pool._CALLER_CPU) == pool._SLEEPING


def test_a_spinning_waiter_sees_news_from_another_thread():
    state = _state()
    ticks = 200 * (pool.spin_ticks() or 1)          # long: the post must end the wait
    seen = []
    t = threading.Thread(target=lambda: seen.append(
        pool.spin_wait(state, pool._GO, ticks, 0, pool._WORKER_CPU, pool._CALLER_CPU)))
    t.start()
    before = pool.post(state, pool._GO, pool._CALLER_CPU)
    t.join(timeout=60)
    # Either the waiter saw the news, or it had stopped spinning (the two threads on one
    # CPU) and the poster was told to release its lock: never neither.
    assert seen == [True] or (seen == [False] and before == pool._SLEEPING)


def test_news_seen_while_spinning_is_returned_after_the_grace():
    state = _state()
    grace = pool.spin_ticks(pool.GRACE_US) or 1000
    pool.post(state, pool._GO, pool._CALLER_CPU)
    t0 = pool._now()
    assert pool.spin_wait(state, pool._GO, 100 * grace, grace, pool._WORKER_CPU,
                          pool._CALLER_CPU)
    assert pool._now() - t0 >= grace or not pool._X86


def test_finish_and_wait_posts_then_waits_for_the_next_job():
    ticks = pool.spin_ticks() // 100 or 1000
    # The next job already posted: the worker goes on without blocking.
    state = _state()
    pool.post(state, pool._GO, pool._CALLER_CPU)
    assert pool.finish_and_wait(state, ticks, 0) == pool._NEXT_JOB
    assert state[pool._DONE] == pool._POSTED
    # No job comes: the state says SLEEPING, so the next post releases the worker's lock.
    state = _state()
    assert pool.finish_and_wait(state, ticks, 0) == pool._BLOCK
    assert state[pool._DONE] == pool._POSTED and state[pool._GO] == pool._SLEEPING
    assert pool.post(state, pool._GO, pool._CALLER_CPU) == pool._SLEEPING
    # The caller had blocked on its lock: the worker must release it before waiting.
    state = _state()
    state[pool._DONE] = pool._SLEEPING
    assert pool.finish_and_wait(state, ticks, 0) == pool._CALLER_SLEEPS
    assert state[pool._DONE] == pool._POSTED and state[pool._GO] == pool._WAITING


@pytest.mark.parametrize("spin_us", ["0", "5", "1000"])
def test_many_hand_offs_spinning_or_blocking(monkeypatch, spin_us):
    """Every mix of spinning and blocking on both sides (0: always block; 5 us: spin, then
    block mid-sequence; 1 ms: mostly spin), with wake-ups between the runs."""
    monkeypatch.setenv("NUMRES_SPIN_US", spin_us)
    executor = _two_threads()
    acc = np.zeros(64, np.int64)
    for i in range(2000):
        if i % 7 == 0:
            with executor.placed():
                pass
        executor.run(64, lambda a, b: acc.__setitem__(slice(a, b), acc[a:b] + 1))
    assert (acc == 2000).all()


def test_passes_whose_threads_keep_waiting_for_each_other_make_the_next_ones_run_alone():
    """Another process busy on the worker's CPU: the worker is off its CPU for a time slice
    in every run while the caller waits. Two such passes make the next passes run in the
    caller alone for a while; then both threads are tried again."""
    executor = _two_threads()
    if not executor._workers[0].spins:
        pytest.skip("hand-offs do not spin here (not x86): contention is never judged")
    caller = threading.get_ident()
    # The worker starts each job 3 ms late (as when it is off its CPU at the hand-off).
    executor._workers[0]._grace = pool.spin_ticks(3000)
    for expected in (False, True):
        with executor.placed():
            for _ in range(pool.CONTENDED_RUNS):
                executor.run(2, lambda a, b: None)
        assert executor.contended == expected
    executor._workers[0]._grace = 0
    assert executor._backoff == 2 * pool.SOLO_S[0]
    seen = []
    with executor.placed():
        executor.run(4, lambda a, b: seen.append((threading.get_ident(), a, b)))
    assert seen == [(caller, 0, 4)]         # one call, in the caller
    # The solo time over, a pass with little waiting brings the first wait back.
    executor._solo_until = 0.0
    executor._note_contention(0.1, 1.0, pool.CONTENDED_RUNS)
    assert not executor.contended and executor._backoff == pool.SOLO_S[0]


@pytest.mark.parametrize("idle, runs, contended", [
    (0.2, 57, False), (1.1, 57, False), (1.8, 57, True), (1.8, 7, False)])  # 7: too few
def test_what_counts_as_contended(idle, runs, contended):
    """Idle seconds per second of a pass (batch 1 on 2 CPUs: 0.1-0.2 on an idle machine,
    1.8 with another process busy on one CPU); it takes two such passes in a row, or one
    while the CPUs were found taken recently."""
    executor = _two_threads()
    if not executor._workers[0].spins:
        pytest.skip("hand-offs do not spin here (not x86): contention is never judged")
    executor._note_contention(idle, 1.0, runs)
    assert not executor.contended                   # one pass may be a hiccup
    executor._note_contention(idle, 1.0, runs)
    assert executor.contended == contended
    for _ in range(10):                             # the wait doubles up to its limit
        executor._note_contention(idle, 1.0, runs)
    assert executor._backoff == (pool.SOLO_S[1] if contended else pool.SOLO_S[0])


def _affinity_settable():
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        return False
    try:
        os.sched_setaffinity(0, os.sched_getaffinity(0))
    except OSError:
        return False
    return pool.current_cpu() >= 0


@pytest.mark.skipif(not _affinity_settable(),
                    reason="needs Linux, 2+ CPUs and permission to set thread affinity")
def test_a_pass_keeps_its_caller_on_one_cpu_and_the_workers_off_it():
    executor = _two_threads()
    before = os.sched_getaffinity(0)
    seen = {}

    def fn(start, stop):
        seen[threading.current_thread().name] = os.sched_getaffinity(0)
    with executor.placed():
        here = os.sched_getaffinity(0)
        executor.run(2, fn)
    assert len(here) == 1 and here <= before
    worker = [v for k, v in seen.items() if k != threading.current_thread().name]
    assert worker and not (worker[0] & here) and worker[0] <= before
    assert os.sched_getaffinity(0) == before     # restored after the pass


@pytest.mark.parametrize("stale", ["post", "lock", "both"])
def test_what_an_interrupted_wait_leaves_behind_is_not_taken_for_the_next_job(stale):
    """A KeyboardInterrupt in a wait can leave a post or a released lock behind; the next
    run must still wait for its own job (it returned at once, the worker still writing)."""
    executor = _two_threads()
    executor.run(2, lambda a, b: None)
    worker = executor._workers[0]
    if stale in ("post", "both"):
        pool.post(worker._state, pool._DONE, pool._WORKER_CPU)
    if stale in ("lock", "both"):
        pool._release(worker._done)
    out = np.zeros(2)

    def fn(start, stop):
        if start > 0:
            time.sleep(0.2)             # the worker's half finishes late
        out[start:stop] = 1
    executor.run(2, fn)
    assert out.sum() == 2
    executor.run(2, lambda a, b: out.__setitem__(slice(a, b), 2))
    assert (out == 2).all()
