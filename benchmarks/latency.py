"""Latency as a service meets it: calls after idle gaps, and a stream of requests with random
gaps, numres beside torch and ONNX Runtime, batch 1 (``--batch``).

Each contender runs in a process of its own, as a service hosts one runtime (idle threads of
the others, in the same process, made numres's calls after a gap 10-20% slower);
``--same-process`` runs them all in this one, the gap cases interleaved across contenders.
Cases, for every contender (its gap cases interleaved at random, so that a slow phase of the
machine falls on all of them alike):

* back to back: a call right after another;
* after a gap: ``time.sleep(gap)``, then the call (0.25 s and 2 s by default);
* request stream: each request follows the previous answer after a random (exponential) gap
  as long as the contender's own back-to-back call on average, so it is busy half the time;
  latency is the call (p50, p99). (Requests arriving on their own clock would add queueing:
  at half load a single server's p99 is several times its p50 whatever the server does.)
  The contenders' streams run in turns of :data:`STREAM_TURN` requests, each turn after
  0.1 s (ONNX Runtime's threads spin for 10-30 ms after a call) and an untimed call, so
  that a slow spell of the machine falls on all of them alike rather than on whichever
  streamed then.

``numres-unplaced`` is numres with its threads neither spinning nor placed
(``NUMRES_SPIN_US=0``, ``NUMRES_PLACE_THREADS=0``): the hand-offs as they were before.
``numres-bf16`` is numres in ``precision="bfloat16"`` (on CPUs with AVX512_BF16).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/latency.py
"""

import argparse
import json
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
from bench import (checkpoint_and_input, import_torch, reference_contenders,  # noqa: E402
                   start_report)


def bf16_runs_here():
    """Whether numres's bfloat16 precision runs on this CPU."""
    try:
        from numres.backends.numba import pairs, tile
    except ImportError:
        return False
    return tile.AVAILABLE and pairs.supported()


def numres_names():
    """The numres contenders this machine runs."""
    return ("numres", "numres-unplaced") + ("numres-bf16",) * bf16_runs_here()


def numres_variants(arch, ckpt, x, names=None):
    """numres as shipped, with spinning and placement off (its own threads; made after the
    shipped one's, which keeps its settings), and in bfloat16."""
    from numres.backends.numba import NumbaBackend, background, threads
    out = []
    for name, env, precision in (
            ("numres", {}, "float32"),
            ("numres-unplaced", {"NUMRES_SPIN_US": "0", "NUMRES_PLACE_THREADS": "0"},
             "float32"),
            ("numres-bf16", {}, "bfloat16")):
        if name not in (names or numres_names()):
            continue
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            backend = NumbaBackend(precision=precision)
            if env:
                # Its own threads, made while the settings hold (the shared ones keep theirs).
                backend._executor = threads.Executor(backend.threads)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        model = numres.build(arch, weights=ckpt, backend=backend)
        out.append(bench.Contender(name, lambda m=model: m(x)))
    background.wait()       # a fresh cache compiles in the background: time the kernels
    return out


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


#: Requests a contender's stream runs before the next contender's turn.
STREAM_TURN = 20


def stream(fn, service, requests, rng):
    """Call times of ``requests`` calls, each after an exponential gap of mean ``service``."""
    latencies = []
    for gap in rng.exponential(service, requests):
        time.sleep(gap)
        latencies.append(timed(fn))
    return np.array(latencies)


def streams(contenders, services, requests, rng):
    """Each contender's :func:`stream` of ``requests``, run in turns of :data:`STREAM_TURN`
    requests: ``{name: call times}``."""
    out = {c.name: [] for c in contenders}
    for start in range(0, requests, STREAM_TURN):
        for c in contenders:
            time.sleep(0.1)         # the last contender's spinning threads are quiet
            c.fn()                  # untimed: this turn starts as a stream goes on
            out[c.name].append(stream(c.fn, services[c.name],
                                      min(STREAM_TURN, requests - start), rng))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gaps", default="0.25,2")
    p.add_argument("--trials", type=int, default=12, help="calls per gap and contender")
    p.add_argument("--requests", type=int, default=300, help="requests per stream")
    p.add_argument("--same-process", action="store_true",
                   help="all contenders in this process")
    p.add_argument("--json", help="write results here")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)     # contender, checkpoint
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    torch_mods, env, _ = start_report()
    gaps = [float(g) for g in args.gaps.split(",") if g]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models.split(","):
            ckpt, x = checkpoint_and_input(arch, tmp, torch_mods, args.batch, args.size)
            if args.same_process:
                contenders = numres_variants(arch, ckpt, x)
                others, notes = reference_contenders(arch, ckpt, torch_mods, tmp, x)
                contenders += [c for c in others if c.name != "torch-cl"]   # NCHW: torch's
                rows = measure(contenders, gaps, args)
            else:
                rows, notes = [], {}
                for name in numres_names() + ("torch-nchw", "onnxruntime"):
                    out = subprocess.run(
                        [sys.executable, os.path.abspath(__file__), "--child", name, ckpt,
                         "--models", arch, "--size", str(args.size), "--gaps", args.gaps,
                         "--batch", str(args.batch),
                         "--trials", str(args.trials), "--requests", str(args.requests)],
                        capture_output=True, text=True)
                    if out.returncode != 0:
                        notes[name] = out.stderr.strip().splitlines()[-1][:200]
                        continue
                    rows += json.loads(out.stdout.strip().splitlines()[-1])
            results.append(report(arch, rows, gaps, args, notes))
    bench.write_results(args.json, env, results)
    return results


def child(args):
    """One contender in this process: its rows as JSON on the last line."""
    name, ckpt = args.child
    arch = args.models
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)) \
        .astype(np.float32)
    if name.startswith("numres"):
        contenders = numres_variants(arch, ckpt, x, (name,))
    else:
        torch_mods, note = import_torch()
        if not torch_mods:
            raise SystemExit(f"torch unavailable: {note}")
        torch_mods[0].set_num_threads(numres.backends.default_threads())
        with tempfile.TemporaryDirectory() as tmp:
            others, notes = reference_contenders(arch, ckpt, torch_mods, tmp, x)
        contenders = [c for c in others if c.name == name]
        if not contenders:
            raise SystemExit(f"{name} unavailable: {notes.get(name, '?')}")
    print(json.dumps(measure(contenders, [float(g) for g in args.gaps.split(",") if g],
                             args)))


def measure(contenders, gaps, args):
    for c in contenders:
        for _ in range(5):
            c.fn()
    cases = [(c, g) for c in contenders for g in [0.0] + gaps] * args.trials
    random.Random(0).shuffle(cases)
    times = {}
    for c, gap in cases:
        c.fn()                                   # the call before: back to back from here
        if gap:
            time.sleep(gap)
        times.setdefault((c.name, gap), []).append(timed(c.fn))
    bases = {c.name: float(np.median(times[(c.name, 0.0)])) for c in contenders}
    lats = streams(contenders, bases, args.requests, np.random.default_rng(1))
    rows = []
    for c in contenders:
        base, lat = bases[c.name], lats[c.name]
        row = {"contender": c.name, "back_to_back_ms": base * 1e3,
               "after_gap_ms": {str(g): float(np.median(times[(c.name, g)])) * 1e3
                                for g in gaps},
               "stream_p50_ms": float(np.percentile(lat, 50)) * 1e3,
               "stream_p99_ms": float(np.percentile(lat, 99)) * 1e3}
        rows.append(row)
    return rows


def report(arch, rows, gaps, args, notes):
    where = "one process" if args.same_process else "a process each"
    print(f"\n## {arch}, batch {args.batch}, {args.size}x{args.size}: latency (medians of "
          f"{args.trials}; a stream of {args.requests} requests at half load; {where})\n")
    gap_cols = " | ".join(f"after {g:g} s (x back to back)" for g in gaps)
    print(f"| contender | back to back | {gap_cols} | stream p50 | stream p99 | p99 / p50 |")
    print("|---|---|" + "---|" * len(gaps) + "---|---|---|")
    for r in rows:
        cells = " | ".join(f"{r['after_gap_ms'][str(g)]:.1f} ms "
                           f"({r['after_gap_ms'][str(g)] / r['back_to_back_ms']:.2f})"
                           for g in gaps)
        print(f"| {r['contender']} | {r['back_to_back_ms']:.1f} ms | {cells} | "
              f"{r['stream_p50_ms']:.1f} ms | {r['stream_p99_ms']:.1f} ms | "
              f"{r['stream_p99_ms'] / r['stream_p50_ms']:.2f} |")
    for k, v in notes.items():
        print(f"\n{k}: {v}")
    return {"model": arch, "size": args.size, "rows": rows, "notes": notes}


if __name__ == "__main__":
    main()
