"""Latency while another process keeps CPUs busy: numres beside torch and ONNX Runtime.

A service rarely has the machine to itself: a data loader, a web server or a second model
may be busy on one of the CPUs. Each case starts such a process (pinned to one CPU, busy all
the time or half of it), then times calls of every contender, interleaved, in this process:

* idle: nothing else running;
* busy on CPU k: a process spinning on CPU k (each CPU in turn);
* half busy on CPU k: busy 5 ms, asleep 5 ms, on CPU k;
* two busy on every CPU: the machine oversubscribed.

Reported: the median and the 90th percentile of the calls. numres runs passes in the calling
thread alone while it finds its threads kept waiting for each other (``threads.py``:
``Executor.contended``); ``numres-always-shared`` is numres with that turned off, the
hand-offs as they were before it.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/contended.py
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

import numres  # noqa: E402
from numres import bench  # noqa: E402
from bench import checkpoint_and_input, reference_contenders, start_report  # noqa: E402

_BUSY = {"busy": "while True:\n    pass\n",
         "half busy": ("import time\nwhile True:\n    t = time.perf_counter()\n"
                       "    while time.perf_counter() - t < 0.005:\n        pass\n"
                       "    time.sleep(0.005)\n")}


def start_busy(kind, cpus):
    """A process pinned to each of ``cpus`` running the ``kind`` loop."""
    procs = [subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, "
                               f"{{{cpu}}})\n" + _BUSY[kind]]) for cpu in cpus]
    time.sleep(0.3)                                  # pinned and running
    return procs


def numres_contenders(arch, ckpt, x):
    """numres as shipped, and with the contended fallback off (its own executor)."""
    from numres.backends.numba import NumbaBackend, background, threads
    out = []
    for name in ("numres", "numres-always-shared"):
        backend = NumbaBackend()
        if name != "numres":
            backend._executor = threads.Executor(backend.threads)
            backend._executor._note_contention = lambda idle, wall, runs: None
        model = numres.build(arch, weights=ckpt, backend=backend)
        out.append(bench.Contender(name, lambda m=model: m(x)))
    background.wait()       # a fresh cache compiles in the background: time the kernels
    return out


def measure(contenders, calls):
    """Seconds per call of every contender, ``calls`` each, interleaved in shuffled rounds."""
    for c in contenders:
        c.times = []
        c.fn()
    order = [c for c in contenders for _ in range(calls)]
    random.Random(0).shuffle(order)
    for c in order:
        c.fn()                       # the call before: back to back from here
        t = time.perf_counter()
        c.fn()
        c.times.append(time.perf_counter() - t)
    return {c.name: (float(np.median(c.times)) * 1e3, float(np.percentile(c.times, 90)) * 1e3)
            for c in contenders}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=15, help="timed calls per contender and case")
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    if not hasattr(os, "sched_setaffinity"):
        raise SystemExit("contended.py pins its busy processes to one CPU: Linux only")
    torch_mods, env, _ = start_report()
    cpus = sorted(os.sched_getaffinity(0))
    cases = [("idle", None)] + [(f"{kind} on CPU {cpu}", (kind, [cpu]))
                                for kind in _BUSY for cpu in cpus] \
        + [("two busy on every CPU", ("busy", cpus * 2))]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models.split(","):
            ckpt, x = checkpoint_and_input(arch, tmp, torch_mods, args.batch, args.size)
            contenders = numres_contenders(arch, ckpt, x)
            others, notes = reference_contenders(arch, ckpt, torch_mods, tmp, x)
            contenders += [c for c in others if c.name != "torch-cl"]
            rows = {}
            for case, busy in cases:
                procs = start_busy(*busy) if busy else []
                try:
                    rows[case] = measure(contenders, args.calls)
                finally:
                    for proc in procs:
                        proc.kill()
                        proc.wait()
            results.append(report(arch, args, [c.name for c in contenders], rows, notes))
    bench.write_results(args.json, env, results)
    return results


def report(arch, args, names, rows, notes):
    print(f"\n## {arch}, batch {args.batch}, {args.size}x{args.size}: ms per call while "
          f"another process is busy (median / 90th percentile of {args.calls})\n")
    print("| case | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for case, row in rows.items():
        print(f"| {case} | " + " | ".join(f"{row[n][0]:.1f} / {row[n][1]:.1f}" for n in names)
              + " |")
    for k, v in notes.items():
        print(f"\n{k}: {v}")
    return {"model": arch, "batch": args.batch, "size": args.size,
            "ms_median_p90": rows, "notes": notes}


if __name__ == "__main__":
    main()
